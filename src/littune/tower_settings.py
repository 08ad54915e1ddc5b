"""The paper's two-letter tower settings.

LiT (Zhai et al., 2021) names a setup by two letters, first the image tower, then the text tower:

* ``L`` -- initialised from a pre-trained model and **locked** (not updated),
* ``U`` -- initialised from a pre-trained model and **unlocked** (trained),
* ``u`` -- randomly initialised and unlocked (trained from scratch).

``Lu`` (locked image tower, text tower from scratch) and ``LU`` are the heart of LiT; the others
exist for comparison. Locking is configuration: it becomes a learning-rate multiplier of 0 for the
tower's parameters (see :func:`littune.model.LiTModel.param_groups`), plus eval mode so that no
statistic (BatchNorm running means) moves either.
"""

from __future__ import annotations

from dataclasses import dataclass

LETTERS = {
    "L": "pre-trained, locked",
    "U": "pre-trained, unlocked",
    "u": "random init, unlocked",
}
VALID_SETTINGS = tuple(a + b for a in "LUu" for b in "LUu")


@dataclass(frozen=True)
class TowerMode:
    """How one tower is initialised and whether it trains."""

    pretrained: bool
    locked: bool

    @classmethod
    def from_letter(cls, letter: str) -> "TowerMode":
        return cls(pretrained=letter in "LU", locked=letter == "L")

    @property
    def letter(self) -> str:
        return "L" if self.locked else ("U" if self.pretrained else "u")


@dataclass(frozen=True)
class TowerSetting:
    """A parsed two-letter setting such as ``Lu``."""

    image: TowerMode
    text: TowerMode

    @property
    def name(self) -> str:
        return self.image.letter + self.text.letter

    def __str__(self) -> str:
        return self.name


def parse_setting(setting: str) -> TowerSetting:
    """Parse ``'Lu'``, ``'LU'``, ``'Uu'``... into a :class:`TowerSetting`; clear error otherwise."""
    if not isinstance(setting, str) or setting not in VALID_SETTINGS:
        legend = "; ".join(f"{k} = {v}" for k, v in LETTERS.items())
        raise ValueError(
            f"invalid tower setting {setting!r}: use two letters, image tower first then text tower "
            f"({legend}). Valid settings: {', '.join(VALID_SETTINGS)}"
        )
    return TowerSetting(TowerMode.from_letter(setting[0]), TowerMode.from_letter(setting[1]))
