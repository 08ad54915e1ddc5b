"""Old name of :mod:`littune.tower_settings` (the two-letter tower settings), kept for importers."""

from .tower_settings import LETTERS, VALID_SETTINGS, TowerMode, TowerSetting, parse_setting  # noqa: F401
