"""A ``timm`` image model as the tower: ``timm:<name>[#pool]`` (the optional extra ``littune[timm]``).

``timm.create_model(name, pretrained=..., num_classes=0)`` gives the network without its classifier,
so its output is the pooled feature vector the classifier would read, with the model's own pooling;
``#pool`` (``#avg``, ``#token``, or ``#pool=avg``...) passes another ``global_pool`` to timm (``#`` +
an empty value, i.e. ``global_pool=''``, leaves tokens or maps, which littune then pools: the first
token, or the mean over positions). The preprocessing is timm's own data config
(``timm.data.resolve_model_data_config``): the input size, the shorter side resized to
``floor(size / crop_pct)`` and centre-cropped, the mean, std and interpolation.

Pre-trained weights come through timm's own download (the Hugging Face hub and its cache); a
name timm does not know, weights that cannot be had (offline and not cached) and a pooling timm
refuses are one-line :class:`~littune.errors.LittuneError` s. As for every tower the fingerprint is
the name (with the pooling) + a hash of the state dict + the preprocessing; a saved model keeps the
weights, so reloading it downloads nothing (an ``hf-hub:`` name, which timm also takes, reads its
configuration from the hub, or its cache, again).
"""

from __future__ import annotations

import difflib
import math
from types import ModuleType

import torch

from ..errors import LittuneError
from ..data.preprocess import Preprocess
from .runtime import first_line
from .base import ImageTower, _pool

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


def import_timm(what: str = "timm:") -> ModuleType:
    """The ``timm`` module, or a one-line ImportError (naming ``what``) that says how to get one that imports.

    ``import timm`` imports torchvision, which fails with a RuntimeError (not an ImportError) where
    its compiled operators do not match the installed torch: that is an ImportError here too."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - torchvision's operator registration raises RuntimeError
        raise ImportError(f"{what} needs `pip install 'littune[timm]'` (timm, and a torchvision that imports "
                          f"beside this torch): import timm failed with {first_line(e)}") from None
    return timm


def timm_tower_name(name: str, pool: str | None = None) -> str:
    """``timm:NAME``, with ``#pool=P`` when another pooling than the model's own is asked for."""
    return f"timm:{name}" if pool is None else f"timm:{name}#pool={pool}"


def timm_preprocess(config: dict) -> Preprocess:
    """timm's eval transform as a :class:`Preprocess`: ``resolve_model_data_config``'s size, crop_pct,
    mean, std and interpolation (the centre crop; littune has no 'squash' or 'border' crop)."""
    size = int(config["input_size"][-1])
    interpolation = config.get("interpolation", "bicubic")
    return Preprocess(size=size, resize=int(math.floor(size / float(config.get("crop_pct") or 1.0))),
                      mean=tuple(config["mean"]), std=tuple(config["std"]),
                      interpolation=interpolation if interpolation in _INTERPOLATIONS else "bicubic")


def _unknown(timm, name: str) -> LittuneError:
    close = difflib.get_close_matches(name.split(".", 1)[0], timm.list_models(), n=4, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "timm.list_models() lists the names"
    return LittuneError(f"timm:{name} is not a timm model ({hint})")


def _hub_error(name: str, error: OSError, pretrained: bool) -> LittuneError:
    """One line for what timm could not get from the hub (offline and not cached, unreachable, not there)."""
    from huggingface_hub import constants

    what = "the pre-trained weights" if pretrained else "the model's configuration"
    if constants.HF_HUB_OFFLINE:
        return LittuneError(f"timm:{name}: cannot get {what}: not in the Hugging Face cache, and "
                            "HF_HUB_OFFLINE=1 is set (unset it to download)")
    return LittuneError(f"timm:{name}: cannot download {what} (HF_HUB_OFFLINE is not set): {first_line(error)}")


class TimmTower(ImageTower):
    """``timm.create_model(name, pretrained, num_classes=0[, global_pool=pool])``, pooled to ``(B, D)``."""

    def __init__(self, name: str, pool: str | None = None, pretrained: bool = True):
        super().__init__()
        timm = import_timm(timm_tower_name(name, pool))
        local = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))  # sources timm resolves itself
        if not local and not timm.is_model(name):
            raise _unknown(timm, name)
        self.name = timm_tower_name(name, pool)
        self.spec = {"type": "timm", "name": name, "pool": pool}
        kwargs = {"num_classes": 0} if pool is None else {"num_classes": 0, "global_pool": pool}
        try:
            self.net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except OSError as e:  # the hub download: offline and not cached, unreachable, not found
            raise _hub_error(name, e, pretrained) from None
        except (RuntimeError, AssertionError, TypeError, ValueError, KeyError) as e:
            raise LittuneError(f"{self.name}: timm could not build it ({first_line(e)})") from None
        self.preprocess = timm_preprocess(timm.data.resolve_model_data_config(self.net))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pool(self.net(pixels), "cls")
