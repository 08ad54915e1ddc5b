"""The LiT trainer: one loop, two data paths.

With a locked image tower (``L*``) batches come from the embedding cache and the image model is
never run: each step is text tower forward + backward + loss + optimiser step. With an unlocked
tower (``U*``, ``u*``), or ``data.on_the_fly``, images are decoded, augmented and run through the
tower every step. Everything else is shared: the global contrastive loss over all ranks, gradient
accumulation that keeps the contrastive batch global, warm-up + decay, gradient clipping, bf16
autocast, checkpoints with exact resume, NaN guard, Ctrl-C checkpoint, progress bar, JSON-lines
metrics, TensorBoard (if installed), periodic validation and PNG plots at the end.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from . import distributed as D
from .batches import CacheBatches, OnTheFlyBatches, length_groups, step_loader
from .accumulate import accumulated_backward
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import ConfigError, LittuneError, StaleCacheError
from .losses import ContrastiveLoss
from .model import LiTConfig, LiTModel
from .optim import build_optimizer, build_scheduler
from .settings import parse_setting
from .towers.image import CachedFeaturesTower, build_image_tower, parse_image_tower
from .towers.text import build_text_tower

# Keys that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = {"steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "val", "device"}


class TrainingDiverged(LittuneError):
    """The loss became NaN or infinite."""


def model_config(cfg: TrainConfig) -> LiTConfig:
    m = cfg.model
    return LiTConfig(setting=m.setting, image_tower=parse_image_tower(m.image_tower), text_tower=dict(m.text_tower),
                     embed_dim=m.embed_dim, image_head=m.image_head, text_head=m.text_head,
                     temperature_init=m.temperature_init, loss=m.loss, bias_init=m.bias_init)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.rank, self.world, self.device = D.init_from_env(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        self.setting = parse_setting(cfg.model.setting)
        self.use_cache = self.setting.image.locked and not cfg.data.on_the_fly
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.skipped_images = 0

    # -- set-up --------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        saved = self.run_dir / "config.yaml"
        if D.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if saved.exists() and latest_checkpoint(self.run_dir):
                old = yaml.safe_load(saved.read_text())
                new = self.cfg.to_dict()
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
                if diff:
                    raise ConfigError(
                        f"{self.run_dir} holds a run with a different configuration ({', '.join(diff)} differ): "
                        "use another run_dir, or delete its checkpoints/ to start over")
            self.cfg.save(saved)
        D.barrier()

    def _open_cache(self):
        from .cache import EmbeddingCache, embed_source

        cache_dir = self.cfg.data.cache
        if not cache_dir:
            raise ConfigError("data.cache: a locked image tower trains from an embedding cache; give its directory "
                              "(it is built from data.source when missing), or set data.on_the_fly=true")
        tower_spec = parse_image_tower(self.cfg.model.image_tower)
        manifest = Path(cache_dir) / "manifest.json"
        if not manifest.exists():
            if not self.cfg.data.source:
                raise ConfigError(f"data.cache: {cache_dir} has no manifest.json and no data.source to build it from")
            from .data.sources import open_source

            # Every rank builds it: under torchrun the shards are split over the ranks (rank 0 writes the
            # manifest); the cache equals a one-process build.
            tower = build_image_tower(tower_spec).eval()
            embed_source(open_source(self.cfg.data.source, **self.cfg.data.source_options), tower, cache_dir,
                         progress=self.cfg.progress and D.is_main(), distributed=self.world > 1)
            del tower
            D.barrier()
        cache = EmbeddingCache.open(cache_dir)
        # The cache must come from the configured tower (and source, when one is named).
        expected = build_image_tower(tower_spec).fingerprint()
        source_fp = None
        if self.cfg.data.source:
            from .data.sources import open_source

            source_fp = open_source(self.cfg.data.source, **self.cfg.data.source_options).fingerprint()
        cache.check(tower_fingerprint=expected, source_fingerprint=source_fp)
        return cache

    def _captions_for_tokenizer(self):
        if self.use_cache:
            yield from self.cache.iter_captions()  # read in chunks: nothing is held per image
        else:
            for r in self.records:
                yield from r.captions

    def _build_model(self) -> LiTModel:
        mcfg = model_config(self.cfg)
        if self.use_cache:
            m = self.cache.manifest
            image = CachedFeaturesTower(m.get("tower_spec", mcfg.image_tower), self.cache.tower_fingerprint,
                                        self.cache.dim, m.get("preprocess", {}))
        else:
            image = build_image_tower(mcfg.image_tower, pretrained=self.setting.image.pretrained)
        text_spec = dict(mcfg.text_tower)
        tok_dir = self.run_dir / "tokenizer"
        if text_spec.get("type", "transformer") == "transformer":
            if D.is_main() and not (tok_dir / "tokenizer.json").exists():
                from .towers.text import train_tokenizer

                tok = train_tokenizer(self._captions_for_tokenizer(), vocab_size=text_spec.get("vocab_size", 8000),
                                      kind=text_spec.get("tokenizer", "bpe"))
                tok.save_pretrained(tok_dir)
            D.barrier()  # every rank uses rank 0's tokenizer
        torch.manual_seed(self.cfg.seed)
        if text_spec.get("type", "transformer") == "transformer":
            text = build_text_tower(text_spec, base_dir=tok_dir)
        else:
            text = build_text_tower(text_spec, pretrained=self.setting.text.pretrained)
        if self.cfg.grad_checkpointing:
            text.gradient_checkpointing = True
        model = LiTModel(mcfg, image, text).to(self.device)
        D.broadcast_parameters(model)
        return model

    # -- one step --------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _embed(self, batch: dict, sl: slice):
        with self._autocast():
            if "image_features" in batch:
                img = self.model.embed_image_features(batch["image_features"][sl].to(self.device))
            else:
                img = self.model.encode_image(batch["pixels"][sl].to(self.device, non_blocking=True))
            txt = self._encode_captions(batch["captions"][sl])
        return img.float(), txt.float()

    def _encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Text embeddings in the captions' order. With ``data.text_buckets`` k > 1 (dynamic padding) one
        tokenization is encoded in <= k groups of similar length, each cut to its own longest (batches.
        length_groups): the tower sees each caption alone (masked attention, no batch statistics), so the
        embeddings are the same, the contrastive batch is still the whole batch, padding costs less."""
        k = min(self.cfg.data.text_buckets, len(captions))
        if k <= 1:
            toks = self.model.tokenize(captions)
            return self.model.encode_text(**{n: v.to(self.device) for n, v in toks.items()})
        toks = self.model.tokenize(captions, padding="longest")
        side = getattr(getattr(self.model.text_tower, "tokenizer", None), "padding_side", "right")
        groups = length_groups(toks, k, padding_side=side)
        parts = [self.model.encode_text(**{n: v.to(self.device) for n, v in g.items()}) for _, g in groups]
        order = torch.cat([rows for rows, _ in groups])
        return torch.cat(parts)[torch.argsort(order).to(self.device)]

    def _loss(self, img, txt):
        return self.loss_fn(img, txt, self.model.logit_scale, self.model.logit_bias)

    def train_step(self, batch: dict) -> torch.Tensor:
        n = len(batch["captions"])
        k = self.cfg.grad_accum
        if k == 1:
            img, txt = self._embed(batch, slice(None))
            loss = self._loss(img, txt)
            loss.backward()
        else:
            if "pixels" in batch and self.setting.image.locked:  # a locked tower runs once, not once a pass
                with torch.no_grad(), self._autocast():
                    feats = self.model.image_features(batch["pixels"].to(self.device, non_blocking=True))
                batch = {"image_features": feats, "captions": batch["captions"]}
            # One big step's gradients, one loss for the whole batch (see littune.accumulate).
            loss = accumulated_backward(self.model, lambda sl: self._embed(batch, sl), self._loss, n, k, self.device)
        D.average_gradients(self.params)
        if self.cfg.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm)
        return loss.detach()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        self._prepare_run_dir()
        if self.use_cache:
            self.cache = self._open_cache()
        else:
            if not cfg.data.source:
                raise ConfigError(f"data.source: setting {cfg.model.setting} runs the image tower every step and "
                                  "needs a source of images (a cache holds only a locked tower's features)")
            from .data.sources import open_source

            self.records = open_source(cfg.data.source, **cfg.data.source_options).records()
        self.model = self._build_model()
        self.loss_fn = ContrastiveLoss(cfg.model.loss, chunk=cfg.model.loss_chunk)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        start = 0
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
            start = int(state["step"])
            self._truncate_metrics(start)
            self._log_line(f"resumed from {ckpt} at step {start}")
        if self.use_cache:
            data = CacheBatches(self.cache, cfg.data.batch_size, self.rank, self.world, cfg.seed)
            batches = (data(s) for s in range(start, cfg.steps))
        else:
            ds = OnTheFlyBatches(self.records, self.model.preprocess, cfg.data.batch_size, self.rank, self.world,
                                 cfg.seed, augment=cfg.data.augment)
            batches = iter(step_loader(ds, start, cfg.steps, cfg.data.workers))
        self.model.train()
        monitor = Monitor(self.run_dir, cfg, start) if D.is_main() else None
        done = start  # steps completed (weights, optimiser and schedule all updated)
        interrupted = False
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            t_last, pairs = time.perf_counter(), 0
            for step in range(start, cfg.steps):
                batch = next(batches)
                self.skipped_images += len(batch.get("skipped", []))
                loss = self.train_step(batch)
                loss_all = D.mean_over_ranks(loss)
                if not torch.isfinite(loss_all):
                    self.optimizer.zero_grad(set_to_none=True)
                    last = latest_checkpoint(self.run_dir)
                    raise TrainingDiverged(
                        f"loss became {loss_all.item()} at step {step}: stopped without saving. Last good checkpoint: "
                        f"{last or 'none'}. Lower optim.lr, raise schedule.warmup_steps or set optim.clip_grad_norm")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                pairs += cfg.data.batch_size
                if monitor:
                    now = time.perf_counter()
                    record = {"step": step + 1, "loss": loss_all.item(), "lr": self.scheduler.get_last_lr()[0],
                              "temperature": self.model.logit_scale.exp().item()}
                    if self.model.logit_bias is not None:
                        record["bias"] = self.model.logit_bias.item()
                    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                        record["pairs_per_s"] = pairs / max(now - t_last, 1e-9)
                        t_last, pairs = now, 0
                    monitor.log(record)
                if cfg.val.every and (step + 1) % cfg.val.every == 0 and step + 1 < cfg.steps:
                    self._validate(step + 1, monitor)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    self._checkpoint(step + 1)
        except KeyboardInterrupt:
            interrupted = True
            self._checkpoint(done)
            self._log_line(f"interrupted: checkpoint written at step {done}; run the same command again to resume")
        finally:
            signal.signal(signal.SIGTERM, previous)
            if monitor:
                monitor.close()
        if interrupted:
            raise KeyboardInterrupt
        self._checkpoint(cfg.steps)
        results = self._validate(cfg.steps, monitor=None, final=True)
        out = self._export()
        if D.is_main():
            if monitor:
                monitor.plots(results)
            if self.skipped_images:
                self._log_line(f"skipped {self.skipped_images} undecodable images during training")
        D.barrier()
        return out

    # -- helpers -------------------------------------------------------------------------------
    def _checkpoint(self, step: int) -> None:
        if D.is_main():
            save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler,
                            extra={"setting": self.cfg.model.setting}, keep=self.cfg.keep_checkpoints)
        D.barrier()

    def _validate(self, step: int, monitor=None, final: bool = False) -> dict:
        if not (self.cfg.val.zeroshot or self.cfg.val.retrieval) or not D.is_main():
            return {}
        from .validate import run_validation

        was = self.model.training
        self.model.eval()
        results = run_validation(self.model, self.cfg.val, device=self.device)
        self.model.train(was)
        line = {"step": step, "val": results}
        with open(self.run_dir / "val.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if monitor:
            monitor.log_val(step, results)
        if final:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        return results

    def _export(self) -> Path:
        out = self.run_dir / "model"
        if D.is_main():
            model = self.model.to("cpu")
            tower = model.image_tower
            if isinstance(tower, CachedFeaturesTower) and tower.spec.get("type") != "efficientnet-lite":
                # Only package towers are stored by reference; others are copied once, from the real tower.
                real = build_image_tower(tower.spec).eval()
                if real.fingerprint() != tower.fingerprint():
                    raise StaleCacheError(f"image tower changed during training: {real.fingerprint()} != "
                                          f"{tower.fingerprint()}")
                model.image_tower = real
                model._apply_locking()
            model.save_pretrained(out)
            model.image_tower = tower
            self.model.to(self.device)
        return out

    def _truncate_metrics(self, step: int) -> None:
        if not D.is_main():
            return
        for path in (self.metrics_path, self.run_dir / "val.jsonl"):
            if path.exists():
                keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
                path.write_text("".join(k + "\n" for k in keep))

    def _log_line(self, text: str) -> None:
        if D.is_main():
            print(f"littune train: {text}", file=sys.stderr)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


class Monitor:
    """Progress bar, metrics.jsonl, TensorBoard (optional), and the end-of-run plots."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int):
        from tqdm.auto import tqdm

        self.run_dir, self.cfg = run_dir, cfg
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model.setting}", unit="step",
                        disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: JSON lines only
            self.tb = None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        post = {"loss": f"{record['loss']:.4f}", "T": f"{record['temperature']:.1f}"}
        if "pairs_per_s" in record:
            post["pairs/s"] = f"{record['pairs_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        if self.tb:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def log_val(self, step: int, results: dict) -> None:
        if self.tb:
            for name, metrics in results.items():
                for k, v in metrics.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"val/{name}/{k}", v, step)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb:
            self.tb.close()

    def plots(self, final: dict) -> None:
        from .plots import plot_run

        plot_run(self.run_dir)
