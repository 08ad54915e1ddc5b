"""The paper's design-choice study on the emoji set: Lu, LU, Uu, UU, uu and LL at equal steps.

Builds (or reuses) the emoji data, embeds it once with the locked EfficientNet-Lite0 at --image-size
for the locked settings, trains every setting for the same number of steps on the same captions,
and evaluates each the same way: zero-shot top-1/top-5 on held-out designs, held-out concepts and
both, and text<->image retrieval, next to chance and an image-only prototype ceiling. Writes one
markdown table, its JSON and one plot. A finished setting is reused on a second run (delete its
runs/<setting> folder to train it again). The unlocked image settings (Uu, UU, uu) run the image
tower forward and backward on every step: on 2 CPU cores they take most of the time. Lu-Uu, not run
by default, is delayed, slow unlocking: the image tower held locked for the first half of the steps,
then unlocked at the 0.1x multiplier of Uu.
"""

from __future__ import annotations

import argparse

HELP = "the paper's design-choice comparison (Lu, LU, Uu, UU, uu, LL)"
EXAMPLE = "littune study --out out/study --steps 200 --settings Lu,LU,Uu,UU,uu,LL"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/study", help="output folder (default out/study)")
    p.add_argument("--settings", default="Lu,LU,Uu,UU,uu,LL",
                   help="comma-separated tower settings (default Lu,LU,Uu,UU,uu,LL; also Lu-Uu: delayed unlocking)")
    p.add_argument("--steps", type=int, default=200, help="training steps for every setting (default 200)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step (default 64)")
    p.add_argument("--image-size", type=int, default=128,
                   help="EfficientNet-Lite0 input size for every setting (default 128: CPU-friendly)")
    p.add_argument("--quick", action="store_true", help="the 200-concept emoji subset (a quick check)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..errors import LittuneError
    from ..study import run_study

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings:
        raise LittuneError("--settings: give at least one tower setting, e.g. Lu,LU")
    if args.steps < 1 or args.batch_size < 2:
        raise LittuneError("--steps must be >= 1 and --batch-size >= 2")
    run_study(args.out, settings=settings, steps=args.steps, batch=args.batch_size, image_size=args.image_size,
              quick=args.quick, progress=not args.quiet)
    return 0
