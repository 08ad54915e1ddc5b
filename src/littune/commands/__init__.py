"""The subcommands of ``littune`` (see :mod:`littune.cli`), and the options several of them share."""

TRUST_CODE_HELP = ("let the model folder's config.json (or the one an index records) name a torch factory "
                   "tower that littune imports and calls: only for a folder you trust (default: refused)")


def add_trust_code(p) -> None:
    """``--trust-code``: what ``trust_code=True`` is in the Python API (:mod:`littune.towers.trust`)."""
    p.add_argument("--trust-code", action="store_true", help=TRUST_CODE_HELP)
