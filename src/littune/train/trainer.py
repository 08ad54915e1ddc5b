"""The LiT trainer: one loop, two data paths.

With a locked image tower (``L*``) batches come from the embedding cache and the image model is
never run: each step is text tower forward + backward + loss + optimiser step. With an unlocked
tower (``U*``, ``u*``), or ``data.on_the_fly``, images are decoded, augmented and run through the
tower every step. Everything else is shared: the global contrastive loss over all ranks, gradient
accumulation that keeps the contrastive batch global, warm-up + decay, gradient clipping, bf16
autocast, checkpoints with exact resume, NaN guard, Ctrl-C checkpoint, and the run directory's
metrics, validation and plots (:mod:`littune.train.monitor`).

What is loaded, and when, with a locked tower: the cache is checked against the configured tower's
fingerprint, computed from the weights file for ``efficientnet-lite`` and ``onnx`` towers (nothing
is built; :mod:`littune.towers.fingerprint`) and by building the tower once on the CPU for ``hf``
and ``torch`` towers (freed at once). A missing cache is first built from ``data.source`` with the
tower. At export, a tower stored by reference (``efficientnet-lite``) is not loaded; the others are
built once more to be copied into ``model/``.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from . import distributed as D
from .batches import (CacheBatches, OnTheFlyBatches, Prefetched, WithTextFeatures, fill_text_cache, length_groups,
                      step_loader)
from .accumulate import accumulated_backward
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..config import LiTConfig, TrainConfig
from ..errors import ConfigError, LittuneError, TrainingDiverged  # noqa: F401 (TrainingDiverged: re-exported)
from .losses import ContrastiveLoss
from ..model.two_towers import LiTModel, save_trained
from .monitor import Monitor, log_line, prepare_run_dir, record_validation, truncate_metrics
from .optim import build_optimizer, build_scheduler, group_lrs, held_groups, lr_mults_line
from .run_outcome import finished_step, interrupted
from .run_plan import Timed, announce, plan_run
from .rundir import StopSignals, close_run_dir, ensure_tokenizer, open_run_dir
from ..model.settings import parse_setting
from ..model.heads import train_tokens
from ..towers.fingerprint import tower_fingerprint
from ..towers.image import CachedFeaturesTower, build_image_tower, parse_image_tower
from ..towers.text import build_text_tower
from ..towers.trust import refuse_cache_code


def model_config(cfg: TrainConfig) -> LiTConfig:
    """The model's configuration: the ``model`` section, with the image tower as a full spec."""
    m = copy.deepcopy(cfg.model)
    return replace(m, image_tower=parse_image_tower(m.image_tower))


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.rank, self.world, self.device = D.init_from_env(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        self.setting = parse_setting(cfg.model.setting)
        self.use_cache = self.setting.image.locked and not cfg.data.on_the_fly
        # a locked text tower reads its caption features from a text cache, computed once
        self.text_cached = self.use_cache and self.setting.text.locked
        self.skipped_images = 0
        self.loss_fn = ContrastiveLoss(cfg.model.loss, chunk=cfg.model.loss_chunk)
        self._saved = None  # the step of the last checkpoint written

    # -- set-up --------------------------------------------------------------------------------
    def _open_data(self) -> None:
        """The cache (locked tower) or the source's records (the tower runs every step)."""
        if self.use_cache:
            self.cache = self._open_cache()
            if self.cfg.data.anchors is not None:  # the tower's own classes, read from its weights file
                from ..data.anchors import cache_head

                self.anchor_head = cache_head(self.cache)
            return
        if not self.cfg.data.source:
            raise ConfigError(f"data.source: setting {self.cfg.model.setting} runs the image tower every step and "
                              "needs a source of images (a cache holds only a locked tower's features)")
        self.records = self._source().records()

    def _source(self):
        from ..data.sources import open_source

        return open_source(self.cfg.data.source, **self.cfg.data.source_options)

    def _open_cache(self):
        from ..cache import EmbeddingCache, embed_source

        cache_dir = self.cfg.data.cache
        if not cache_dir:
            raise ConfigError("data.cache: a locked image tower trains from an embedding cache; give its directory "
                              "(it is built from data.source when missing), or set data.on_the_fly=true")
        tower_spec = parse_image_tower(self.cfg.model.image_tower)
        built = None
        if not (Path(cache_dir) / "manifest.json").exists():
            if not self.cfg.data.source:
                raise ConfigError(f"data.cache: {cache_dir} has no manifest.json and no data.source to build it from")
            # Every rank builds it: under torchrun the shards are split over the ranks (rank 0 writes the
            # manifest); the cache equals a one-process build.
            built = build_image_tower(tower_spec).eval()
            embed_source(self._source(), built, cache_dir, progress=self.cfg.progress and D.is_main(),
                         distributed=self.world > 1, tokens=self.cfg.model.image_head == "attention" or None)
            D.barrier()
        cache = EmbeddingCache.open(cache_dir)
        # The cache must come from the configured tower (and source, when one is named).
        expected = tower_fingerprint(tower_spec, built)
        del built
        source_fp = self._source().fingerprint() if self.cfg.data.source else None
        cache.check(tower_fingerprint=expected, source_fingerprint=source_fp)
        return cache

    def _captions_for_tokenizer(self):
        if self.use_cache:
            yield from self.cache.iter_captions()  # read in chunks: nothing is held per image
            for names in self.anchor_head.names if self.cfg.data.anchors is not None else ():
                yield from names  # data.anchors: the class names are captions too
        else:
            for r in self.records:
                yield from r.captions

    def _image_tower(self, mcfg: LiTConfig):
        if self.use_cache:
            m = self.cache.manifest
            spec = m.get("tower_spec", mcfg.image_tower)  # the spec _export builds: no code the config does not name
            refuse_cache_code(spec, parse_image_tower(mcfg.image_tower), Path(self.cfg.data.cache) / "manifest.json")
            tower = CachedFeaturesTower(spec, self.cache.tower_fingerprint, self.cache.dim, m.get("preprocess", {}))
            return train_tokens(mcfg, tower, self.cache, self.cfg.val)  # the attention head: a token cache
        return build_image_tower(mcfg.image_tower, pretrained=self.setting.image.pretrained)

    def _text_tower(self, mcfg: LiTConfig):
        text_spec = dict(mcfg.text_tower)
        tok_dir = self.run_dir / "tokenizer"
        from_scratch = text_spec.get("type", "transformer") == "transformer"
        if from_scratch:
            if D.is_main():  # trained, or checked against the spec and captions it came from (littune.train.rundir)
                ensure_tokenizer(tok_dir, text_spec, self._captions_for_tokenizer,
                                 resuming=latest_checkpoint(self.run_dir) is not None)
            D.barrier()  # every rank uses rank 0's tokenizer
        torch.manual_seed(self.cfg.seed)
        if from_scratch:
            return build_text_tower(text_spec, base_dir=tok_dir)
        return build_text_tower(text_spec, pretrained=self.setting.text.pretrained)

    def _build_model(self) -> LiTModel:
        mcfg = model_config(self.cfg)
        image = self._image_tower(mcfg)
        text = self._text_tower(mcfg)
        if self.cfg.grad_checkpointing:
            text.gradient_checkpointing = True
        model = LiTModel(mcfg, image, text).to(self.device)
        D.broadcast_parameters(model)
        return model

    def _build_training(self) -> int:
        """Model, optimiser and schedule, restored from the latest checkpoint; returns the first step."""
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        log_line(lr_mults_line(self.model, self.cfg.optim.lr_mults))
        self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, self.cfg.steps, self.cfg.optim.unlock)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.text_cached:
            self._fill_text_cache()
        ckpt = latest_checkpoint(self.run_dir)
        start = 0 if ckpt is None else int(load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)["step"])
        truncate_metrics(self.run_dir, start)  # lines a stopped run wrote after it (all of them with no checkpoint)
        if ckpt is not None:
            log_line(f"resumed from {ckpt} at step {start}")
        return start

    def _cache_batches(self) -> CacheBatches:
        if getattr(self, "_cache_data", None) is None:
            cfg = self.cfg
            self._cache_data = CacheBatches(self.cache, cfg.data.batch_size, self.rank, self.world, cfg.seed,
                                            cfg.data.exclude, language_share=cfg.data.language_share,
                                            extra=self._anchors(), budget=cfg.data.caption_budget,
                                            tokens=cfg.model.image_head == "attention")
            if cfg.data.exclude:
                log_line(f"excluded {self._cache_data.excluded:,} training images listed in {cfg.data.exclude}")
        return self._cache_data

    def _fill_text_cache(self) -> None:
        """A locked text tower: every caption a batch can draw, computed once into ``data.text_cache``
        (rank 0; the others read what it wrote), which validation and evaluation read too."""
        folder = self.cfg.data.text_cache or self.run_dir / "text-cache"
        if D.is_main():
            fill_text_cache(self.model, folder, self._cache_batches().texts(), self.cfg.progress)
        D.barrier()
        if not D.is_main():
            self.model.use_text_cache(folder)

    def _batches(self, start: int):
        cfg = self.cfg
        if self.use_cache:
            data = self._cache_batches()
            if self.text_cached:  # the captions' features read from the text cache, in the prefetch thread
                data = WithTextFeatures(data, self.model.text_store)
            return Prefetched(data, range(start, cfg.steps))
        ds = OnTheFlyBatches(self.records, self.model.preprocess, cfg.data.batch_size, self.rank, self.world,
                             cfg.seed, augment=cfg.data.augment, language_share=cfg.data.language_share)
        return iter(step_loader(ds, start, cfg.steps, cfg.data.workers))

    def _anchors(self):
        """``data.anchors``: the tower's classes as extra rows (littune.data.anchors), or None."""
        if self.cfg.data.anchors is None:
            return None
        from ..data.anchors import anchor_rows

        return anchor_rows(self.cache, self.cfg.data.anchors, self.anchor_head, self.cfg.data.exclude, log_line)

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
            if "text_features" in batch:
                txt = self.model.embed_text_features(batch["text_features"][sl].to(self.device))
            else:
                txt = self._encode_captions(batch["captions"][sl])
        return img.float(), txt.float()

    def _encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Text embeddings in the captions' order. A tower that packs (the text transformer: no compute
        on padding) encodes the batch in one call. Otherwise, with ``data.text_buckets`` k > 1 (dynamic
        padding), one tokenization is encoded in <= k groups of similar length, each cut to its own
        longest (batches.length_groups): the tower sees each caption alone (masked attention, no batch
        statistics), so the embeddings are the same, the contrastive batch is still the whole batch,
        padding costs less."""
        k = min(self.cfg.data.text_buckets, len(captions))
        packs = self.model.text_tower.packs
        if packs or k <= 1:  # one call: padded to the longest (computed on real tokens only), or to the context
            toks = self.model.tokenize(captions, padding="longest" if packs else "max_length")
            return self.model.encode_text(**{n: v.to(self.device) for n, v in toks.items()})
        toks = self.model.tokenize(captions, padding="longest")
        groups = length_groups(toks, k, padding_side=self.model.text_tower.padding_side)
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
            if "pixels" in batch and (self.setting.image.locked or "image" in self.model.held):
                # a locked (or held) tower runs once, not once a pass
                with torch.no_grad(), self._autocast():
                    feats = self.model.image_features(batch["pixels"].to(self.device, non_blocking=True))
                batch = {"image_features": feats, "captions": batch["captions"]}
            # One big step's gradients, one loss for the whole batch (see littune.train.accumulate).
            loss = accumulated_backward(self.model, lambda sl: self._embed(batch, sl), self._loss, n, k, self.device)
        D.average_gradients(self.params)
        if self.cfg.optim.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm)
        return loss.detach()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train ``steps`` steps (resuming from the latest checkpoint), validate, export ``model/``."""
        held = open_run_dir(self.run_dir) if D.is_main() else None  # one run at a time (littune.train.rundir)
        try:
            self._open_data()
            self.cfg, self.plan = plan_run(self)  # batch, steps, warm-up: those not set sized from the data, printed
            self.finished = finished_step(self.run_dir, self.cfg)  # a finished run's step (it is not trained again)
            if self.finished is not None:
                return self.run_dir / "model"
            announce(self.plan)
            prepare_run_dir(self.run_dir, self.cfg)
            start = self._build_training()
            self._loop(start, Timed(self._batches(start), start, self.cfg.steps))  # prints the measured time a step
            return self._finish()
        finally:
            if held is not None:
                close_run_dir(held)

    def _loop(self, start: int, batches) -> None:
        """The steps from ``start``. Ctrl-C or SIGTERM stops at the next step boundary (the step under
        way completes), writes a checkpoint of that step and raises KeyboardInterrupt (rundir.StopSignals)."""
        self.model.train()
        monitor = Monitor(self.run_dir, self.cfg, start) if D.is_main() else None
        self._done = start  # steps completed (weights, optimiser and schedule all updated)
        self._clock = (time.perf_counter(), 0)  # time of the last throughput record, pairs since
        stop = StopSignals()
        try:
            with stop:
                for step in range(start, self.cfg.steps):
                    if stop.asked(self.device):
                        break
                    self._step(step, next(batches), monitor)
                if stop.asked(self.device):
                    if self._saved != self._done:
                        self._checkpoint(self._done)
                    raise interrupted(self._done, monitor) from None  # said once, below the bar
        finally:
            getattr(batches, "close", lambda: None)()
            if monitor:
                monitor.close()

    def _step(self, step: int, batch: dict, monitor) -> None:
        """One optimiser step, then what is due after it: metrics, validation, a checkpoint."""
        cfg = self.cfg
        self.skipped_images += len(batch.get("skipped", []))
        self.model.hold(held_groups(cfg.optim.unlock, step))  # optim.unlock: held as locked while its factor is 0
        loss = D.mean_over_ranks(self.train_step(batch))
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {step}: stopped without saving. Last good checkpoint: "
                f"{latest_checkpoint(self.run_dir) or 'none'}. Lower optim.lr, raise schedule.warmup_steps or set "
                "optim.clip_grad_norm")
        self.optimizer.step()
        lrs = group_lrs(self.optimizer, step, cfg.optim.lr, cfg.schedule, cfg.steps) if monitor else {}
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._done = done = step + 1
        if monitor:
            monitor.log(self._record(done, loss, lrs))
        if cfg.val.every and done % cfg.val.every == 0 and done < cfg.steps:
            self._validate(done, monitor)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            self._checkpoint(done)

    def _record(self, done: int, loss: torch.Tensor, lrs: dict) -> dict:
        """The metrics line of a step: loss, the learning rates the step used (:func:`littune.train.optim.
        group_lrs`), temperature; throughput every ``log_every`` steps and at the last."""
        record = {"step": done, "loss": loss.item(), **lrs, "temperature": self.model.logit_scale.exp().item()}
        if self.model.logit_bias is not None:
            record["bias"] = self.model.logit_bias.item()
        t_last, pairs = self._clock
        pairs += self.cfg.data.batch_size
        if done % self.cfg.log_every == 0 or done == self.cfg.steps:
            now = time.perf_counter()
            record["pairs_per_s"] = pairs / max(now - t_last, 1e-9)
            t_last, pairs = now, 0
        self._clock = (t_last, pairs)
        return record

    def _finish(self) -> Path:
        """The last checkpoint, the final validation, the model directory and the plots."""
        self._checkpoint(self.cfg.steps)
        self._validate(self.cfg.steps, monitor=None, final=True)
        out = self._export()
        if D.is_main():
            from ..plots import plot_run

            plot_run(self.run_dir)
            if self.skipped_images:
                log_line(f"skipped {self.skipped_images} undecodable images during training")
        D.barrier()
        return out

    # -- helpers -------------------------------------------------------------------------------
    def _checkpoint(self, step: int) -> None:
        if D.is_main():
            save_checkpoint(self.run_dir, step, self.model, self.optimizer, self.scheduler,
                            extra={"setting": self.cfg.model.setting}, keep=self.cfg.keep_checkpoints)
        D.barrier()
        self._saved = step

    def _validate(self, step: int, monitor=None, final: bool = False) -> dict:
        if not (self.cfg.val.zeroshot or self.cfg.val.retrieval) or not D.is_main():
            return {}
        from .validation import run_validation

        was = self.model.training
        self.model.eval()
        results = run_validation(self.model, self.cfg.val, device=self.device)
        self.model.train(was)
        record_validation(self.run_dir, step, results, final)
        if monitor:
            monitor.log_val(step, results)
        return results

    def _export(self) -> Path:
        out = self.run_dir / "model"
        if D.is_main():
            try:
                save_trained(self.model.to("cpu"), out)
            except OSError as e:  # a full disk: the folder is written whole or not at all
                raise LittuneError(f"{out} was not written ({e.strerror or e}); the checkpoint of step "
                                   f"{self.cfg.steps} is intact: free disk space and run the same command again") from e
            self.model.to(self.device)
        return out
