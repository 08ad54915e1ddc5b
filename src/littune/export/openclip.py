"""open_clip's calling convention for a littune model directory.

Code written for open_clip -- CLIP_benchmark's evaluators, clip-retrieval, a notebook -- loads a
model, a transform and a tokenizer and then only calls a handful of things::

    model, _, preprocess = littune.create_model_and_transforms("runs/lu/model")  # open_clip: 3-tuple
    model, preprocess = littune.create_model_from_pretrained("runs/lu/model")    # open_clip: 2-tuple
    tokenizer = littune.get_tokenizer("runs/lu/model")
    tokens = tokenizer(["a photo of a cat", "a photo of a dog"])   # int64 (N, context_length)
    txt = model.encode_text(tokens)                                 # (N, D), not normalised
    img = model.encode_image(torch.stack([preprocess(pil) for pil in images]))
    logits = model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T

The functions here give exactly those names and return shapes, so such code runs a littune model
with the directory in place of open_clip's model name. As in open_clip, ``encode_image`` and
``encode_text`` return the projection heads' outputs *before* L2 normalisation unless
``normalize=True``; normalised, they equal littune's own image and text embeddings
(:meth:`~littune.model.LiTModel.encode_image`, :meth:`~littune.inference.mixin.InferenceMixin.encode_texts`).
``model.logit_scale`` is the log temperature (a parameter; ``exp()`` multiplies the cosines),
``model.logit_bias`` the sigmoid loss's bias or ``None``, and ``model.lit`` the
:class:`~littune.model.LiTModel` itself for littune's own methods (``classify``...).

open_clip's tokens carry no attention mask; littune's text towers need one. The tokenizer pads on
the right with the text tower's pad token, and ``encode_text`` masks the run of pad tokens at the
end of each row (every row ends in an end-of-text token before it, so a pad token inside a text is
never taken for padding). Columns that are padding in every row are dropped first, so the tower
sees what littune's own text path feeds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LittuneError

__all__ = ["OpenCLIPModel", "Tokenizer", "Transform", "create_model", "create_model_and_transforms",
           "create_model_from_pretrained", "get_tokenizer"]


class Transform:
    """``preprocess(pil_image) -> float32 (3, S, S)``: the image tower's evaluation transform (or, with
    ``train=True``, its training augmentation), after littune's RGB conversion (alpha on white)."""

    def __init__(self, preprocess, train: bool = False):
        self.preprocess, self.train = preprocess, train

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        from ..data.decode import to_rgb

        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess takes a PIL image, not {type(image).__name__}")
        image = to_rgb(image)
        return self.preprocess.train(image) if self.train else self.preprocess.eval(image)

    def __repr__(self) -> str:
        return f"Transform({'train' if self.train else 'eval'}, {self.preprocess!r})"


class _Visual(nn.Module):
    """``model.visual``: pixels to the image head's output, with open_clip's ``image_size``,
    ``image_mean`` and ``image_std`` (littune's eval transform resizes the shorter side to the
    tower's ``resize_to`` before the centre crop). It holds the LiT model's own image tower and
    head (no copy)."""

    def __init__(self, lit):
        super().__init__()
        self.tower, self.head = lit.image_tower, lit.image_head
        p = lit.preprocess
        self.image_size = (p.size, p.size)
        self.image_mean, self.image_std = tuple(p.mean), tuple(p.std)
        object.__setattr__(self, "_lit", lit)  # not a submodule: the parameters are the tower's and head's

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        lit = self._lit
        feats = lit.image_features(pixels)
        return lit.image_head(feats.to(_head_dtype(lit.image_head, feats)))


def _head_dtype(head: nn.Module, x: torch.Tensor) -> torch.dtype:
    return head.weight.dtype if isinstance(head, nn.Linear) else x.dtype


class OpenCLIPModel(nn.Module):
    """A :class:`~littune.model.LiTModel` answering open_clip's ``CLIP`` calls (see the module docstring)."""

    def __init__(self, lit):
        super().__init__()
        self.lit = lit
        object.__setattr__(self, "visual", _Visual(lit))  # shares lit's modules; lit's state dict only
        tok = lit.text_tower.tokenizer
        if tok.pad_token_id is None:
            raise LittuneError("the model's text tokenizer has no pad token: its tokens cannot be unpadded")
        self.pad_id = int(tok.pad_token_id)
        self.context_length = int(lit.text_tower.context_length)
        self.embed_dim = int(lit.config.embed_dim)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.lit.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return self.lit.logit_bias

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, D)`` image features from preprocessed pixels ``(B, 3, S, S)``; L2-normalised with
        ``normalize=True`` (then equal to littune's image embeddings)."""
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, D)`` text features from the tokenizer's ids ``(B, L)``; L2-normalised with
        ``normalize=True`` (then equal to littune's text embeddings)."""
        ids, mask = unpad(text, self.pad_id)
        lit = self.lit
        if ids.shape[1] > self.context_length:
            raise LittuneError(f"texts of {ids.shape[1]} tokens: this model reads at most {self.context_length}")
        if lit.setting.text.locked:
            with torch.no_grad():
                feats = lit.text_tower(ids, mask)
        else:
            feats = lit.text_tower(ids, mask)
        x = lit.text_head(feats)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """open_clip's ``CLIP.forward``: ``(image_features, text_features, logit_scale.exp())``, both
        normalised (``None`` for a missing input), plus ``logit_bias`` for a sigmoid-loss model."""
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        if self.logit_bias is not None:
            return img, txt, self.logit_scale.exp(), self.logit_bias
        return img, txt, self.logit_scale.exp()


def unpad(tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` from right-padded token ids: a row's padding is its trailing run of
    ``pad_id``; columns that are padding in every row are dropped."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise LittuneError(f"encode_text takes integer token ids (N, L) from get_tokenizer, not "
                           f"{getattr(tokens, 'dtype', type(tokens).__name__)} {list(getattr(tokens, 'shape', []))}")
    length = unpadded_lengths(tokens, pad_id)
    keep = max(int(length.max()) if len(length) else 0, 1)
    pos = torch.arange(1, keep + 1, device=tokens.device)
    mask = (pos.unsqueeze(0) <= length.unsqueeze(1)).long()
    return tokens[:, :keep].long(), mask


def unpadded_lengths(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per row, the position of its last token that is not ``pad_id`` (0 for a row of padding)."""
    if tokens.shape[1] == 0:
        return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    pos = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return ((tokens != pad_id).long() * pos).amax(dim=1)


class Tokenizer:
    """``tokenizer(texts) -> int64 (N, context_length)``, padded on the right with the pad token and
    cut at ``context_length`` (one string gives ``N = 1``), as open_clip's tokenizers do."""

    def __init__(self, hf_tokenizer, context_length: int):
        self.tokenizer = hf_tokenizer
        self.context_length = int(context_length)
        self.pad_token_id = int(hf_tokenizer.pad_token_id)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise LittuneError(f"texts must be strings, got {type(bad[0]).__name__} ({bad[0]!r})")
        n = self.context_length if context_length is None else int(context_length)
        if not 1 <= n <= self.context_length:
            raise LittuneError(f"context_length {n}: this model reads 1 to {self.context_length} tokens")
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=n,
                             return_tensors="pt", return_token_type_ids=False)
        ids = enc["input_ids"].long()
        if not torch.equal(unpadded_lengths(ids, self.pad_token_id), enc["attention_mask"].long().sum(1)):
            raise LittuneError("the text tokenizer does not pad on the right: its tokens cannot be unpadded")
        return ids


def _model_dir(model_name: str | Path, pretrained) -> Path:
    if pretrained not in (None, ""):
        raise LittuneError(f"a littune model is its directory: pass it as the first argument, "
                           f"not pretrained={pretrained!r}")
    path = Path(model_name)
    if not (path / "config.json").exists():
        raise LittuneError(f"{path} is not a littune model directory (no config.json)")
    return path


def create_model(model_name: str | Path, pretrained: str | None = None, precision: str = "fp32",
                 device: str | torch.device | None = "cpu", trust_code: bool = False, **_ignored) -> OpenCLIPModel:
    """open_clip's ``create_model``: the model of the littune directory ``model_name``, in eval mode on
    ``device`` (``None``: CPU). Only ``precision="fp32"``; open_clip's other keywords are ignored.
    ``trust_code``: as :meth:`littune.LiTModel.from_pretrained`'s (refused by default)."""
    from ..model.two_towers import LiTModel

    path = _model_dir(model_name, pretrained)
    if precision != "fp32":
        raise LittuneError(f"precision {precision!r}: littune models run in fp32 here")
    lit = LiTModel.from_pretrained(path, map_location="cpu", trust_code=trust_code)
    return OpenCLIPModel(lit).to(device if device is not None else "cpu").eval()


def create_model_and_transforms(model_name: str | Path, pretrained: str | None = None, precision: str = "fp32",
                                device: str | torch.device | None = "cpu", **kw):
    """open_clip's ``create_model_and_transforms``: ``(model, preprocess_train, preprocess_val)``."""
    model = create_model(model_name, pretrained, precision, device, **kw)
    p = model.lit.preprocess
    return model, Transform(p, train=True), Transform(p)


def create_model_from_pretrained(model_name: str | Path, pretrained: str | None = None, precision: str = "fp32",
                                 device: str | torch.device | None = "cpu", return_transform: bool = True, **kw):
    """open_clip's ``create_model_from_pretrained``: ``(model, preprocess_val)``, or the model alone with
    ``return_transform=False``."""
    model = create_model(model_name, pretrained, precision, device, **kw)
    return (model, Transform(model.lit.preprocess)) if return_transform else model


def get_tokenizer(model_name: str | Path, context_length: int | None = None, **_ignored) -> Tokenizer:
    """open_clip's ``get_tokenizer``: the tokenizer saved in the littune directory ``model_name``
    (read without loading the model), cutting at the text tower's context length (or a shorter
    ``context_length``)."""
    path = _model_dir(model_name, None)
    spec = json.loads((path / "config.json").read_text())["config"]["text_tower"]
    from .._hf import quiet_transformers

    quiet_transformers()
    if spec.get("type", "transformer") == "transformer":
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast.from_pretrained(path / "text")
    else:  # with the tower's prefix, as the tower tokenizes (littune.towers.text.with_prefix)
        from ..towers.text import load_hf_tokenizer

        hf = load_hf_tokenizer(path / "text", spec.get("prefix"))
    if hf.pad_token_id is None:
        raise LittuneError(f"the tokenizer in {path / 'text'} has no pad token")
    tok = Tokenizer(hf, spec["context_length"])
    if context_length is not None:
        if not 1 <= int(context_length) <= tok.context_length:
            raise LittuneError(f"context_length {context_length}: this model reads 1 to {tok.context_length} tokens")
        tok.context_length = int(context_length)
    return tok
