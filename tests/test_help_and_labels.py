"""What a person reads: every command's --help lists the same template sets."""

from __future__ import annotations

import re

import pytest

from littune.cli import COMMANDS, main
from littune.eval.templates import builtin_sets


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def _option_help(text: str, option: str) -> str:
    """The help of ``option`` up to the next option."""
    found = re.search(rf" {option} ([A-Z_]+), -\w \1 (.*?)(?= --?\w|$)", text)
    assert found, f"{option} not in {text[:300]}"
    return found.group(2)


def _command_helps(capsys) -> dict[str, str]:
    helps = {name: _help(capsys, [name]) for name in COMMANDS}
    helps["eval zeroshot"] = _help(capsys, ["eval", "zeroshot"])
    helps["eval retrieval"] = _help(capsys, ["eval", "retrieval"])
    return helps


def test_every_templates_option_lists_every_shipped_template_set(capsys):
    shipped = builtin_sets()
    assert "emoji" in shipped and "short" in shipped
    with_option = {name: _option_help(text, "--templates") for name, text in _command_helps(capsys).items()
                   if "--templates TEMPLATES," in text}
    assert {"classify", "eval zeroshot"} <= set(with_option)
    for name, text in with_option.items():
        listed = [s for s in shipped if re.search(rf"\b{s}\b", text)]
        assert listed == shipped, f"littune {name} --help: --templates lists {listed}, littune ships {shipped}"
    assert len(set(with_option.values())) == 1, with_option  # one text, from littune.eval.templates
