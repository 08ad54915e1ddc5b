"""The main job's pipeline (data -> caches -> Lu training -> table) and the study, with tiny towers.

The emoji data come from the fake npm folder of test_builders; the image tower is the tiny CNN and
the text tower a 1-layer transformer, so the whole path runs in seconds on the real code.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("resvg")

from conftest import TINY_TEXT  # noqa: E402
from test_builders import DESIGNS, SIZE, _fake_npm, _fake_openclipart  # noqa: E402

from littune.studies import benchmark as bench  # noqa: E402
from littune.studies import quickstart as qs  # noqa: E402
from littune.studies import settings_study as study  # noqa: E402
from littune.cache import EmbeddingCache  # noqa: E402
from littune.config import load_config  # noqa: E402
from littune.eval.sets import read_classnames  # noqa: E402
from littune.towers.tiny import SPEC  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 24  # enough for the tiny model to learn its training pairs well above chance
# the tiny tower puts many training images within dedup's 0.99 of an evaluation image: 7 are left to train on
BATCH = 4
METRICS = ("acc1", "acc5", "image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
           "text_retrieval_recall@5")


def _mtimes(*dirs, pattern: str = "*") -> dict:
    return {p: p.stat().st_mtime_ns for d in dirs for p in sorted(d.rglob(pattern)) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs")
    npm = _fake_npm(root / "npm")
    opts = dict(designs=DESIGNS, packages=npm, size=SIZE, workers=1, cache=root / "dl", log=lambda m: None)
    paths = bench.prepare(root / "out", quick=False, tower=SPEC, progress=False, **opts)
    return root, paths, opts


@pytest.fixture(scope="module")
def quickstart(prepared):
    """One tiny quickstart run through :func:`run_quickstart` (the function behind `make quickstart`)."""
    root, _, opts = prepared
    opts = {**opts, "clipart": {"source": _fake_openclipart(root / "clipart"), "size": SIZE, "workers": 1,
                                "fractions": (0.6, 0.2, 0.2)}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = qs.run_quickstart(root / "out", steps=STEPS, batch=BATCH, image_tower=SPEC, text_tower=TINY_TEXT,
                                   embed_dim=16, progress=False, recipe="Lu-scratch", **opts)
        from littune.studies.quickstart_data import prepare_mix

        paths = prepare_mix(root / "out", False, tower=SPEC, progress=False, **opts)  # reused: what it trained on
    finally:
        torch.set_num_threads(threads)
    return root / "out", paths, result, opts


def test_prepare_builds_every_cache_and_reuses_them(prepared):
    root, paths, opts = prepared
    assert set(paths["eval"]) == {"heldout_designs", "heldout_concepts", "heldout_both"}
    for info in paths["eval"].values():
        cache = EmbeddingCache.open(info["cache"])
        assert len(cache) > 0 and all(cache.captions(i) for i in range(len(cache)))
        assert info["classnames"].is_file()
    caches = [paths["train"]] + [info["cache"] for info in paths["eval"].values()]
    drawn = _mtimes(paths["data"] / "images", pattern="*.png")
    before = _mtimes(*caches)
    tables = {p: p.read_bytes() for p in paths["data"].rglob("*") if p.is_file() and p.suffix in (".csv", ".txt")}
    again = bench.prepare(root / "out", quick=False, tower=SPEC, progress=False, **opts)
    assert again["train"] == paths["train"] and again["eval"] == paths["eval"]
    assert _mtimes(paths["data"] / "images", pattern="*.png") == drawn  # no image drawn again
    assert _mtimes(*caches) == before  # no cache file written again
    assert {p: p.read_bytes() for p in tables} == tables  # the builder rewrites its tables: the same bytes


def test_prototype_baseline_by_hand(prepared):
    _, paths, _ = prepared
    train, test = EmbeddingCache.open(paths["train"]), EmbeddingCache.open(paths["eval"]["heldout_designs"]["cache"])
    got = bench.prototype_baseline(paths["train"], paths["eval"]["heldout_designs"]["cache"])
    # By hand: centre on the training mean (after normalising), average per concept, nearest prototype.
    def norm(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ft = norm(np.asarray(train.features(np.arange(len(train))), dtype=np.float64))
    mu = norm(ft.mean(0, keepdims=True))
    cid = [k.rsplit("/", 1)[-1][:-4] for k in (train.key(i) for i in range(len(train)))]
    classes = sorted(set(cid) & {test.key(i).split("/")[1] for i in range(len(test))})
    protos = norm(np.stack([norm(ft - mu)[[c == k for c in cid]].mean(0) for k in classes]))
    hits = n = 0
    for i in range(len(test)):
        c = test.key(i).split("/")[1]
        if c in classes:
            f = norm(norm(np.asarray(test.features(np.array([i])), dtype=np.float64)) - mu)
            hits += int(np.argmax(f @ protos.T) == classes.index(c))
            n += 1
    assert got["images"] == n and got["classes"] == len(classes)
    assert got["acc1"] == pytest.approx(hits / n, abs=1 / n + 1e-9)  # float32 vs float64: one tie at most
    assert bench.prototype_baseline(paths["train"], paths["eval"]["heldout_both"]["cache"]) is None  # no seen concept


def test_quickstart_model_beats_chance_on_its_training_pairs(quickstart):
    from littune.model.two_towers import LiTModel
    from littune.train.validation import retrieval_on_cache

    out, paths, _, _ = quickstart
    model = LiTModel.from_pretrained(out / "run" / "model")
    train = EmbeddingCache.open(paths["train"])
    got = retrieval_on_cache(model, train)
    chance = 1 / len(train)  # a caption's own image among the training images
    assert got["image_retrieval_recall@1"] > 2.5 * chance
    losses = [json.loads(ln)["loss"] for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])  # it learned on the way


def test_quickstart_results_json_holds_every_split_and_metric_with_the_commit(quickstart):
    out, paths, result, _ = quickstart
    saved = json.loads((out / "results.json").read_text())
    assert saved["commit"] == bench.code_commit() == result["commit"]
    assert f"littune commit {saved['commit']}" in saved["header"]
    assert saved["steps"] == STEPS and saved["batch"] == BATCH
    assert [r["split"] for r in saved["rows"]] == list(paths["eval"]) == list(bench.SPLITS)
    validated = json.loads((out / "run" / "results.json").read_text())  # the trainer's final validation
    for row in saved["rows"]:
        split = row["split"]
        assert row["classes"] == len(read_classnames(paths["eval"][split]["classnames"]))
        assert row["chance_acc1"] == pytest.approx(1 / row["classes"])
        assert row["images"] == paths["manifest"]["counts"]["eval"][split]["images"]
        assert row["acc1"] == validated[split]["acc1"] and row["acc5"] == validated[split]["acc5"]
        for k in METRICS[2:]:
            assert row[k] == validated[f"{split}_retrieval"][k]
        assert all(isinstance(row[k], float) and 0 <= row[k] <= 1 for k in METRICS)


def test_quickstart_table_shows_the_numbers_of_results_json(quickstart):
    out, _, result, _ = quickstart
    saved = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md.startswith(saved["header"] + "\n\n")
    lines = [ln for ln in md.splitlines() if ln.startswith("| heldout_")]
    assert len(lines) == len(saved["rows"])
    for line, row in zip(lines, saved["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"{row['split']}: {row['tests']}"
        assert cells[1:4] == [str(row["images"]), str(row["classes"]), f"{row['chance_acc1']:.4f}"]
        proto = row["prototype"]
        assert cells[4] == (f"{proto['acc1']:.3f} ({proto['classes']} classes)" if proto else "n/a (no concept seen)")
        assert cells[5:] == [bench.fmt(row[k]) for k in METRICS]


def test_quickstart_and_study_evaluation_give_the_trainers_numbers(quickstart):
    from littune.model.two_towers import LiTModel

    out, paths, _, _ = quickstart
    validated = json.loads((out / "run" / "results.json").read_text())
    model = LiTModel.from_pretrained(out / "run" / "model")
    again = bench.evaluate(model, paths, locked=True)  # what the study reports for every setting
    assert set(again) == set(validated) - {"openclipart_test_retrieval"}  # the study evaluates the emoji splits
    for split in paths["eval"]:
        assert again[split]["acc1"] == pytest.approx(validated[split]["acc1"])
        for k, v in validated[f"{split}_retrieval"].items():
            assert again[f"{split}_retrieval"][k] == pytest.approx(v)


def test_quickstart_second_run_reuses_data_caches_and_model(quickstart):
    out, paths, result, opts = quickstart
    kept = _mtimes(out / "run", out / "caches") | _mtimes(paths["data"] / "images", pattern="*.png")
    again = qs.run_quickstart(out, steps=STEPS, batch=BATCH, image_tower=SPEC, text_tower=TINY_TEXT, embed_dim=16,
                              progress=False, recipe="Lu-scratch", **opts)
    now = _mtimes(out / "run", out / "caches") | _mtimes(paths["data"] / "images", pattern="*.png")
    assert now == kept  # nothing drawn, embedded or trained again
    assert again["rows"] == result["rows"]


def test_study_settings_train_the_right_towers(prepared, quickstart):
    from littune.model.two_towers import LiTModel
    from littune.towers.image import build_image_tower

    root, paths, _ = prepared
    towers = {"scratch": TINY_TEXT, "pretrained": TINY_TEXT}
    for setting in ("Lu", "Uu"):
        ov = study.setting_overrides(setting, paths, root / setting, 4, 8, SPEC, text_towers=towers, embed_dim=16)
        cfg = load_config(overrides=ov)
        assert cfg.model.setting == setting and cfg.data.augment is False
        assert (cfg.data.cache is not None) == (setting[0] == "L")  # locked image: from the cache
        assert cfg.optim.lr_mults["image"] == (0.1 if setting[0] == "U" else 1.0)
    row = study.run_setting("Uu", paths, root / "study", 4, 8, SPEC, progress=False, text_towers=towers,
                            embed_dim=16)
    assert row["setting"] == "Uu" and set(row["metrics"]) >= {"heldout_designs", "heldout_concepts_retrieval"}
    assert row["trainable_params"] > 0 and np.isfinite(row["final_loss"])
    assert row["commit"] == bench.code_commit()  # each row says which code trained it
    # U: the pre-trained image tower moved; L (the quickstart's Lu run): it is exactly the pre-trained one.
    pretrained = build_image_tower(SPEC).state_dict()
    for run, moved in ((root / "study" / "runs" / "Uu", True), (quickstart[0] / "run", False)):
        tower = LiTModel.from_pretrained(run / "model").image_tower.state_dict()
        same = all(torch.equal(tower[k], v) for k, v in pretrained.items() if v.is_floating_point())
        assert same != moved, run
    # A finished setting is read back, not trained again.
    kept = _mtimes(root / "study" / "runs" / "Uu")
    assert study.run_setting("Uu", paths, root / "study", 4, 8, SPEC, progress=False, text_towers=towers) == row
    assert _mtimes(root / "study" / "runs" / "Uu") == kept
    table = study.markdown(
        [row], {"chance": {s: 0.0005 for s in paths["eval"]}, "image-only prototype (seen concepts)": {}})
    assert f"**Uu** | {row['commit']} |" in table and "| chance |" in table
    assert "| 0.0005 |" in table  # chance with 1,914 classes must not print as 0.001


def test_quickstart_trains_on_both_sources_in_every_language_without_duplicates(quickstart):
    import csv

    from littune.data.dedup import read_keys

    out, paths, result, _ = quickstart
    with open(paths["source"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["image"].split("/")[0] for r in rows} == {paths["data"].name, paths["clipart"]["data"].name}
    assert {r["lang"] for r in rows} == {"en", "de", ""}  # emoji in both languages, Openclipart untagged
    train = EmbeddingCache.open(paths["train"])
    assert train.languages == ["", "de", "en"] and len(train) == len({r["image"] for r in rows})
    cfg = load_config(out / "run" / "config.yaml")
    assert cfg.data.language_share == qs.RECIPES["Lu-scratch"].language_share and cfg.data.exclude == str(paths["exclude"])
    assert result["duplicates_excluded"] == paths["duplicates"] == len(read_keys(paths["exclude"]))
    assert f"{paths['duplicates']} near-duplicates of evaluation images excluded" in result["header"]


def test_quickstart_reports_every_language_in_json_and_table(quickstart):
    out, paths, result, _ = quickstart
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["lang"] for r in saved["languages"]] == paths["languages"] == ["en", "de"]
    for r in saved["languages"]:
        for k in ("heldout_designs_acc1", "heldout_concepts_acc1"):
            assert 0 <= r[k] <= 1 and r[k.replace("acc1", "chance")] > 0
    md = (out / "results.md").read_text(encoding="utf-8")
    for r in saved["languages"]:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {r['lang']} |"))
        assert line.split("|")[2].strip() == f"{r['heldout_designs_acc1']:.3f}"
    assert saved["language_summary"]["en"]["lang"] == "en"
    assert (out / "languages.png").is_file()
    assert "openclipart_test_retrieval" in json.loads((out / "run" / "results.json").read_text())


def test_delayed_unlocking_setting_holds_the_image_tower_for_half_the_steps_then_trains_it(prepared):
    from littune.errors import LittuneError

    root, paths, _ = prepared
    towers = {"scratch": TINY_TEXT, "pretrained": TINY_TEXT}
    cfg = load_config(overrides=study.setting_overrides("Lu-Uu", paths, root / "d", 20, 8, SPEC, text_towers=towers))
    assert cfg.model.setting == "Uu" and cfg.data.cache is None
    assert cfg.optim.unlock == {"image": {"after": 10, "ramp": 2}} and cfg.optim.lr_mults["image"] == 0.1
    row = study.run_setting("Lu-Uu", paths, root / "study", 4, 8, SPEC, progress=False, text_towers=towers,
                            embed_dim=16)
    assert row["setting"] == "Lu-Uu" and set(row["metrics"]) >= {"heldout_designs", "heldout_designs_retrieval"}
    run = root / "study" / "runs" / "Lu-Uu"
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_image"] > 0 for r in log] == [False, False, True, True]  # held for 2 of 4 steps
    assert all(r["lr_text"] > 0 for r in log)
    assert "**Lu-Uu** |" in study.markdown([row], {"chance": {}})
    with pytest.raises(LittuneError, match="invalid tower setting 'Lu>U'.*also runs Lu-Uu") as e:
        study.study_setting("Lu>U")
    assert "\n" not in str(e.value)


def test_study_lu_trains_a_pretrained_text_tower_at_0_1_with_its_word_embeddings_frozen(prepared, tmp_path):
    """What the study says of U: the pre-trained text tower at 0.1x, its word embeddings frozen (littune's
    default), and the trainable parameters it reports are the ones that trained."""
    from tiny_bert import hf_model, tiny_bert

    from littune.model.two_towers import LiTModel

    root, paths, _ = prepared
    folder = tiny_bert(tmp_path / "bert")
    towers = {"scratch": TINY_TEXT, "pretrained": {"type": "hf", "path": str(folder), "context_length": 16}}
    row = study.run_setting("LU", paths, tmp_path / "study", 4, 8, SPEC, progress=False, text_towers=towers,
                            embed_dim=16)
    run = tmp_path / "study" / "runs" / "LU"
    log = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_text"] / r["lr"] for r in log] == pytest.approx([0.1] * 4) and "lr_text_embeddings" not in log[0]
    trained, start = LiTModel.from_pretrained(run / "model"), hf_model(folder)
    name = "net.embeddings.word_embeddings.weight"
    assert torch.equal(dict(trained.text_tower.named_parameters())[name], dict(start.text_tower.named_parameters())[name])
    heads = sum(p.numel() for m in (trained.image_head, trained.text_head) for p in m.parameters()) + 1
    words = dict(trained.text_tower.named_parameters())[name].numel()
    assert row["trainable_params"] == sum(p.numel() for p in trained.text_tower.parameters()) - words + heads


def test_an_openclipart_build_that_fails_beside_the_emoji_raises_its_own_error(prepared, tmp_path):
    """The Openclipart build runs in a second process beside the emoji build; its error reaches the
    main job as the one-line error it raised there, after the emoji build is done."""
    from littune.errors import LittuneError
    from littune.studies.quickstart_data import prepare_mix

    root, _, opts = prepared
    missing = tmp_path / "no-such-folder"
    with pytest.raises(LittuneError, match="no-such-folder"):
        prepare_mix(root / "out", False, tower=SPEC, progress=False,
                    **{**opts, "clipart": {"source": missing, "size": SIZE, "workers": 1}})
    assert (root / "out" / "data" / "emoji-all-langs" / "train.csv").is_file()


def test_the_default_ll_recipe_trains_heads_from_two_caches_and_evaluates_every_language_from_the_text_cache(
        quickstart, tmp_path):
    """The main job's default recipe (``LL-e5``) with a small pre-trained BERT in place of e5: the
    caption features are computed once into the text cache, which the validation and the per-language
    evaluation then read and extend; the run's report says what trained."""
    from test_text_cache import make_bert

    from littune.cache.text import TextFeatureCache

    out, paths, _, opts = quickstart
    import csv

    with open(paths["source"], newline="", encoding="utf-8") as f:
        captions = [r["caption"] for r in csv.DictReader(f)]
    bert = make_bert(tmp_path / "bert", captions)
    tower = {"type": "hf", "path": str(bert), "context_length": 24}
    result = qs.run_quickstart(out, steps=STEPS, batch=BATCH, image_tower=SPEC, text_tower=tower, embed_dim=16,
                               progress=False, run_name="ll", **opts)
    assert result["setting"] == "LL" and result["caption_budget"] == qs.RECIPES["LL-e5"].caption_budget
    assert "LiT `LL`" in result["header"] and "locked, each caption's features computed once" in result["header"]
    folder = qs.text_cache_dir(out, tower)
    store = TextFeatureCache.open(folder, json.loads((folder / "manifest.json").read_text())["tower"], 24)
    names = read_classnames(paths["eval"]["heldout_designs"]["classnames"])
    assert all(n in store for n in names)  # the bare-name prompts of the per-language evaluation
    assert (out / "ll" / "report" / "results.md").is_file() and [r["lang"] for r in result["languages"]] == ["en", "de"]


def test_text_study_rows_report_english_and_the_other_languages_with_their_ratio(quickstart):
    from littune.studies import text_study

    out, _, result, _ = quickstart
    row = text_study.study_row("Lu-scratch", result)
    assert row["setting"] == "Lu" and row["steps"] == STEPS and row["train_seconds"] > 0
    en, others = row["en_heldout_concepts_t2i_r1"], row["others_heldout_concepts_t2i_r1"]
    assert row["others_over_en_t2i"] == (pytest.approx(others / en) if others is not None else None)
    assert row["others_heldout_designs_acc1"] == result["language_summary"]["mean_other_heldout_designs_acc1"]
    table = text_study.markdown([row])
    assert table.count("\n") == 2 and f"| **Lu-scratch** | Lu | scratch 1x" in table
    with pytest.raises(Exception, match="unknown row 'nope'"):
        text_study.run_text_study(out, ["nope"])
