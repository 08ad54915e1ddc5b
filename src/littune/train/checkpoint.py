"""Training checkpoints: written to a temporary name and renamed, the last K kept.

A checkpoint directory ``checkpoints/step_000200/`` holds ``model.safetensors`` (every weight that
can change; a locked image tower's are not copied), ``trainer.pt`` (optimizer and scheduler state,
RNG states: plain tensors and numbers, read back with ``torch.load(weights_only=True)``) and
``state.json`` (step, config hash). The files are written (through :mod:`littune.fileio`, each
fsync'ed) into a temporary folder that is then renamed: a crash at any moment leaves either the old
or the new checkpoint complete, never a partial one under the final name. A checkpoint that cannot be
written (a full disk) is one line saying so and naming the previous one, which is intact; its
temporary folder is removed (and one a killed run left is removed when the next run starts).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from ..errors import LittuneError
from ..fileio import atomic_write, fsync_dir, replace_dir, write_json

PREFIX = "step_"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    skip_image = model.setting.image.locked
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if not (skip_image and k.startswith("image_tower."))}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, extra: dict | None = None,
                    keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write(tmp, step, model, optimizer, scheduler, extra)
        replace_dir(tmp, final)  # a checkpoint saved again: the old one moved aside, removed after
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            previous = latest_checkpoint(run_dir)
            raise LittuneError(
                f"checkpoint of step {step} was not written ({e.strerror or e}): "
                + (f"{previous} is intact; free disk space and run the same command again to resume from it"
                   if previous else "there is no earlier one; free disk space and run the same command again")
            ) from e
        raise
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(folder: Path, step: int, model, optimizer, scheduler, extra: dict | None) -> None:
    # each file is fsync'ed (fileio) before the folder's rename publishes them
    atomic_write(folder / "model.safetensors", save_safetensors(_trainable_state(model)))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
    atomic_write(folder / "trainer.pt", lambda f: _torch_save(trainer, f))
    write_json(folder / "state.json", {"step": step, **(extra or {})})


def _torch_save(obj, f) -> None:
    """``torch.save`` to the file ``f``, a failed write (a full disk) raised as its own OSError: torch
    reports it as a RuntimeError that names no cause."""
    failed = []

    class Writer:
        def write(self, data):
            try:
                return f.write(data)
            except OSError as e:
                failed.append(e)
                raise

        def flush(self):
            f.flush()

    try:
        torch.save(obj, Writer())
    except RuntimeError:
        if failed:
            raise failed[0] from None
        raise


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimiser, scheduler and RNG states; returns ``state.json``."""
    path = Path(path)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.setting.image.locked and k.startswith("image_tower."))]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    return json.loads((path / "state.json").read_text())
