"""The paper's two-letter tower settings.

LiT (Zhai et al., 2021) names a setup by two letters, first the image tower, then the text tower:

* ``L`` -- initialised from a pre-trained model and **locked** (not updated),
* ``U`` -- initialised from a pre-trained model and **unlocked** (trained),
* ``u`` -- randomly initialised and unlocked (trained from scratch).

``Lu`` (locked image tower, text tower from scratch) and ``LU`` are the heart of LiT; the others
exist for comparison. Locking is configuration: it becomes a learning-rate multiplier of 0 for the
tower's parameters (see :func:`littune.model.LiTModel.param_groups`), plus eval mode so that no
statistic (BatchNorm running means) moves either. A pre-trained ``hf`` text tower that trains
(``LU``, ``UU``) does so at 0.1x with its word embeddings frozen unless ``optim.lr_mults`` says
otherwise (:data:`PRETRAINED_TEXT_LR_MULTS`).
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


#: The optimiser's parameter groups, each with a learning-rate multiplier (``optim.lr_mults``):
#: ``text_embeddings`` is the input word-embedding table of an ``hf`` text tower (the rest is ``text``).
LR_GROUPS = ("image", "text", "text_embeddings", "head")
#: The multipliers of a pre-trained ``hf`` text tower that trains (``LU``, ``UU``) unless the config
#: sets them: the paper's 0.1 for fine-tuning, and the word embeddings frozen (e5-small's are 96M of
#: its 118M parameters: nothing to learn there from a few captions, and a dense AdamW step over them
#: costs more than the rest of the step).
PRETRAINED_TEXT_LR_MULTS = {"text": 0.1, "text_embeddings": 0.0}


def default_lr_mults(setting: str | TowerSetting, text_kind: str) -> dict[str, float]:
    """The multipliers ``setting`` implies for a text tower of type ``text_kind`` where the config is silent."""
    setting = parse_setting(setting) if isinstance(setting, str) else setting
    return dict(PRETRAINED_TEXT_LR_MULTS) if setting.text.letter == "U" and text_kind == "hf" else {}


def check_lr_mults(lr_mults, text_kind: str) -> None:
    """``optim.lr_mults``: known groups (a close name suggested), numbers >= 0; ``text_embeddings`` only
    for an ``hf`` text tower. A one-line :class:`~littune.errors.ConfigError` naming the key."""
    import difflib

    from ..errors import ConfigError

    if not isinstance(lr_mults, dict):
        raise ConfigError(f"optim.lr_mults: expected a mapping like {{text: 0.1}}, got {lr_mults!r}")
    for name, value in lr_mults.items():
        key = f"optim.lr_mults.{name}"
        if name not in LR_GROUPS:
            close = difflib.get_close_matches(str(name), LR_GROUPS, n=1)
            hint = f"did you mean optim.lr_mults.{close[0]}? " if close else ""
            raise ConfigError(f"{key}: unknown group; {hint}use {', '.join(LR_GROUPS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{key}: expected a number >= 0, got {value!r}")
        if name == "text_embeddings" and text_kind != "hf":
            raise ConfigError(f"{key}: only an hf text tower has a word-embedding group of its own (a "
                              f"{text_kind} tower's token embeddings train with text)")
