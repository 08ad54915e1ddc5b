"""Errors a user can act on: the command line prints them as one line, never a traceback."""


class LittuneError(Exception):
    """A user-facing error with a clear message (bad input, bad configuration, stale cache...)."""


class ConfigError(LittuneError, ValueError):
    """A configuration key or value is wrong; the message names the key."""


class StaleCacheError(LittuneError):
    """An embedding cache does not match the configured tower or source (names both fingerprints)."""


class UntrustedCodeError(LittuneError):
    """A model folder (or a file that came with one) names code to import and call, and the user did not
    opt in (``trust_code=True`` / ``--trust-code``)."""


class TrainingDiverged(LittuneError):
    """The loss became NaN or infinite."""
