"""What a person reads: every command's --help lists the same template sets, and every retrieval metric
printed for a person names its direction (text→image, image→text), not CLIP_benchmark's key alone."""

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


def test_help_texts_of_eval_retrieval_name_both_directions(capsys):
    text = _help(capsys, ["eval"])
    assert "text→image R@K" in text and "image→text R@K" in text


def test_metric_labels_name_the_direction_of_every_recall():
    from littune.eval.names import metric_label

    assert metric_label("image_retrieval_recall@1") == "text→image R@1"  # the image is what is retrieved
    assert metric_label("text_retrieval_recall@10") == "image→text R@10"
    assert metric_label("acc5") == "zero-shot top-5"
    assert metric_label("loss") == "loss"


def test_arrows_become_ascii_on_a_stream_that_cannot_encode_them(tiny_set, tmp_path):
    """A terminal in ASCII or Latin-1 gets '->' rather than a UnicodeEncodeError at the end of the run."""
    import io
    import os
    import subprocess
    import sys

    from littune.eval.names import for_stream

    assert for_stream("text→image R@1", io.TextIOWrapper(io.BytesIO(), encoding="latin-1")) == "text->image R@1"
    assert for_stream("text→image R@1", io.TextIOWrapper(io.BytesIO(), encoding="utf-8")) == "text→image R@1"
    done = subprocess.run([sys.executable, "-m", "littune", "eval", "retrieval", str(tiny_set / "pairs.csv"), "--model",
                           str(tiny_set / "model"), "-q"], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"text->image R@1 " in done.stdout and b"image->text R@1 " in done.stdout


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """A tiny saved model and four captioned images in two class folders (a CSV of captions beside them)."""
    import numpy as np
    import torch
    from PIL import Image

    from conftest import CAPTIONS, TINY_TEXT
    from littune import LiTConfig, LiTModel
    from littune.towers.tiny import SPEC

    root = tmp_path_factory.mktemp("labels")
    rows = ["image,caption"]
    for k, (name, rgb) in enumerate({"red": (220, 30, 30), "blue": (30, 60, 220)}.items()):
        for i in range(2):
            (root / "zs" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((36, 36, 3), rgb, np.uint8)).save(root / "zs" / name / f"{i}.png")
            rows.append(f"zs/{name}/{i}.png,a {name} square number {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    cfg = LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16)
    LiTModel.from_config(cfg, captions=CAPTIONS).save_pretrained(root / "model")
    return root


def _metric_lines(out: str) -> dict[str, str]:
    """``{key: the line}`` of every printed metric line (one ending in ``(key)``)."""
    return {ln.rsplit("(", 1)[1].rstrip(")"): ln for ln in out.splitlines() if re.search(r"\(\S+\)$", ln)}


def test_eval_retrieval_prints_each_recall_with_its_direction(tiny_set, capsys):
    rc = main(["eval", "retrieval", str(tiny_set / "pairs.csv"), "--model", str(tiny_set / "model"), "-q",
               "--ks", "1,2"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = _metric_lines(out)
    assert set(lines) == {"image_retrieval_recall@1", "image_retrieval_recall@2", "text_retrieval_recall@1",
                          "text_retrieval_recall@2"}, out
    for key, line in lines.items():
        direction = "text→image" if key.startswith("image_") else "image→text"
        assert line.startswith(f"{direction} R@{key[-1]} "), line
        assert re.search(r" [01]\.\d{4} ", line), line


def test_eval_zeroshot_prints_named_metrics(tiny_set, capsys):
    rc = main(["eval", "zeroshot", str(tiny_set / "zs"), "--model", str(tiny_set / "model"), "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = _metric_lines(out)
    assert lines["acc1"].startswith("zero-shot top-1 ") and lines["acc5"].startswith("zero-shot top-5 ")


def _header_cells(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[0].strip("|").split("|")]


def test_study_tables_name_the_direction_of_every_r_at_1_column():
    """Each table's R@1 column says text→image or image→text (an R@5 beside it reads with it)."""
    from littune.studies import quickstart, settings_study as study, text_study, tower_study

    metrics = {s: {"acc1": 0.5} for s in ("heldout_designs", "heldout_concepts")}
    metrics.update({f"{s}_retrieval": {"image_retrieval_recall@1": 0.25} for s in ("heldout_designs", "heldout_concepts")})
    study_row = {"setting": "Lu", "commit": "abc", "trainable_params": 1e6, "train_seconds": 3.0, "final_loss": 1.0,
                 "metrics": metrics}
    splits = {s: {"acc1": 0.5, "t2i_r1": 0.25, "prototype_acc1": None} for s in ("heldout_designs", "heldout_concepts")}
    tower_row = {"tower": "lite0", "label": "lite0", "input_px": 224, "dim": 1280, "embed": None, "commit": "abc",
                 "splits": splits}
    tables = {"quickstart": quickstart.markdown_table([]), "text_study": text_study.markdown([]),
              "study": study.markdown([study_row], {}), "tower_study": tower_study.markdown([tower_row])}
    for name, table in tables.items():
        cells = _header_cells(table)
        r1 = [c for c in cells if "R@1" in c]
        assert r1, (name, cells)
        for cell in r1:
            assert "text→image" in cell or "image→text" in cell, f"{name}: column {cell!r} does not say which way"
        assert not any("retrieval_recall" in c for c in cells), (name, cells)
