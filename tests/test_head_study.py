"""The head study's configurations, step timing and table (the study itself is a command, not a test)."""

import json

import pytest
import yaml

from littune.config import load_config
from littune.errors import LittuneError
from littune.studies import head_study


def _main_job(tmp_path):
    """A main job's run/config.yaml as the quickstart writes it (LL, linear head, warm-up steps set)."""
    cfg = {"model": {"setting": "LL", "image_tower": "efficientnet-lite0", "image_head": "linear"},
           "data": {"source": "q/data/train.csv", "cache": "q/caches/mix-lite0/train", "batch_size": 1024,
                    "exclude": "q/caches/mix-lite0/dedup.tsv", "language_share": {"en": 0.9},
                    "caption_budget": {"en": 8, "*": 2}, "text_cache": "q/caches/text-e5"},
           "optim": {"lr": 0.001}, "schedule": {"warmup_steps": 200}, "steps": 2000,
           "val": {"every": 1000,
                   "zeroshot": [{"name": "heldout_designs", "cache": "q/caches/mix-lite0/heldout_designs",
                                 "classnames": "q/data/eval/heldout_designs/classnames.txt", "templates": "emoji"}],
                   "retrieval": [{"name": "openclipart_test_retrieval", "cache": "q/caches/mix-lite0/openclipart_test"}]}}
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.mark.parametrize("key", [k for k in head_study.ROWS if head_study.ROWS[k].head == "attention"])
def test_attention_rows_overrides_make_valid_configs_reading_token_caches(tmp_path, key):
    path, cfg = _main_job(tmp_path)
    row, out = head_study.ROWS[key], tmp_path / "hs"
    c = load_config(path, head_study.overrides(row, cfg, out, out / "run", 321), need_data=False)
    tokens = out / "caches" / f"tok{row.grid or 7}"
    assert c.model.image_head == "attention" and c.steps == 321 and c.data.batch_size == row.batch
    assert c.data.cache == str(tokens / "train") and c.val.every == 321
    assert c.schedule.warmup_steps is None and c.schedule.warmup_fraction == 0.1  # a fraction of the steps
    assert [v["cache"] for v in c.val.zeroshot] == [str(tokens / "heldout_designs")]
    assert [v["cache"] for v in c.val.retrieval] == [str(tokens / "openclipart_test")]
    assert c.val.zeroshot[0]["classnames"] == cfg["val"]["zeroshot"][0]["classnames"]
    # the main job's recipe is kept
    assert c.optim.lr == 0.001 and c.data.text_cache == "q/caches/text-e5" and c.data.language_share == {"en": 0.9}
    assert c.data.caption_budget == {"en": 8, "*": 2} and c.data.exclude == "q/caches/mix-lite0/dedup.tsv"


def test_linear_timing_run_keeps_pooled_caches_and_validates_nothing(tmp_path):
    path, cfg = _main_job(tmp_path)
    items = head_study.overrides(head_study.ROWS["linear"], cfg, tmp_path / "hs", tmp_path / "t", 40, validate=False)
    c = load_config(path, items, need_data=False)
    assert c.model.image_head == "linear" and c.data.cache == "q/caches/mix-lite0/train"
    assert c.val.zeroshot == [] and c.val.retrieval == [] and c.checkpoint_every == 0
    assert c.log_every == head_study.TIMING_LOG


def test_step_seconds_leave_out_the_first_interval_and_train_seconds_add_all(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 1.0, "pairs_per_s": 100.0},
             {"step": 20, "loss": 1.0, "pairs_per_s": 200.0}, {"step": 25, "loss": 1.0, "pairs_per_s": 400.0}]
    metrics.write_text("\n".join(json.dumps(x) for x in lines))
    assert head_study.step_seconds(metrics, batch=100) == [0.5, 0.25]
    assert head_study.train_seconds(metrics, batch=100) == pytest.approx(10 * 1.0 + 10 * 0.5 + 5 * 0.25)
    assert head_study.equal_steps(2000, 0.13, 0.65) == 400


def test_table_has_chance_then_one_line_a_row(tmp_path):
    fig = {c: 0.25 for c, _ in head_study.COLUMNS}
    rows = [{"row": "linear", "head": "linear", "grid": None, "blocks": 0, "steps": 2000, "batch": 1024,
             "s_per_step": 0.13, "train_s": 260.0, "commit": "abc1234", **fig},
            {"row": "attention", "head": "attention", "grid": None, "blocks": 0, "steps": 400, "batch": 1024,
             "s_per_step": 0.65, "train_s": 261.0, "commit": "abc1234", **fig, "pointing": None}]
    table = head_study.markdown(rows, {"heldout_designs": 1 / 2000}).splitlines()
    assert len(table) == 5 and table[2].startswith("| chance |") and "0.0005" in table[2]
    assert table[3].startswith("| **linear** | linear | pooled | 2000 x 1024 | 0.13 | 260 | abc1234 | 0.250 |")
    assert table[4].startswith("| **attention** | attention | 7x7 | 400 x 1024 | 0.65 | 261 |")
    assert table[4].endswith("| n/a |")


def test_unknown_row_is_one_line_before_anything_is_written(tmp_path):
    with pytest.raises(LittuneError, match="unknown row 'mlp'"):
        head_study.run_head_study(tmp_path / "q", tmp_path / "hs", rows=("mlp",))
    assert not (tmp_path / "hs").exists()


def test_a_row_whose_run_missed_the_linear_time_is_matched_to_its_own_speed():
    assert head_study.matched_steps(334.0, {"train_s": 104.0, "s_per_step": 0.97}) == 344
    assert head_study.matched_steps(334.0, {"train_s": 300.0, "s_per_step": 2.8}) is None  # within 20%


def test_kept_timing_is_read_back_so_the_rows_keep_their_steps(tmp_path):
    kept = {"linear": {"s_per_step": 0.17, "rounds": [0.17]}, "attention": {"s_per_step": 3.1, "rounds": [3.1]}}
    (tmp_path / "head-study-timing.json").write_text(json.dumps(kept))
    assert head_study.session_timing(tmp_path / "q", tmp_path, ["linear", "attention"], 2, 30) == kept


def test_the_linear_control_row_keeps_pooled_caches_at_its_fixed_batch(tmp_path):
    path, cfg = _main_job(tmp_path)
    row = head_study.ROWS["linear-b256"]
    c = load_config(path, head_study.overrides(row, cfg, tmp_path / "hs", tmp_path / "r", row.steps), need_data=False)
    assert c.model.image_head == "linear" and c.data.batch_size == 256 and c.steps == row.steps
    assert c.data.cache == "q/caches/mix-lite0/train"
    assert [v["cache"] for v in c.val.zeroshot] == ["q/caches/mix-lite0/heldout_designs"]
