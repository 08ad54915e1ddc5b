"""The main job's pipeline (data -> caches -> Lu training -> table) and the study, with tiny towers.

The emoji data come from the fake npm folder of test_builders; the image tower is the tiny CNN and
the text tower a 1-layer transformer, so the whole path runs in seconds on the real code.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("resvg_py")

from conftest import TINY_TEXT  # noqa: E402
from test_builders import DESIGNS, SIZE, _fake_npm  # noqa: E402

from littune import quickstart as qs  # noqa: E402
from littune import study  # noqa: E402
from littune.cache import EmbeddingCache  # noqa: E402
from littune.config import load_config  # noqa: E402
from littune.towers.tiny import SPEC  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs")
    npm = _fake_npm(root / "npm")
    opts = dict(designs=DESIGNS, packages=npm, size=SIZE, workers=1, cache=root / "dl", log=lambda m: None)
    paths = qs.prepare(root / "out", quick=False, tower=SPEC, progress=False, **opts)
    return root, paths, opts


def test_prepare_builds_every_cache_and_reuses_them(prepared):
    root, paths, opts = prepared
    assert set(paths["eval"]) == {"heldout_designs", "heldout_concepts", "heldout_both"}
    for info in paths["eval"].values():
        cache = EmbeddingCache.open(info["cache"])
        assert len(cache) > 0 and all(cache.captions(i) for i in range(len(cache)))
        assert info["classnames"].is_file()
    stamp = (paths["train"] / "manifest.json").stat().st_mtime_ns
    again = qs.prepare(root / "out", quick=False, tower=SPEC, progress=False, **opts)
    assert again["train"] == paths["train"]
    assert (paths["train"] / "manifest.json").stat().st_mtime_ns == stamp  # reused, not re-embedded


def test_prototype_baseline_by_hand(prepared):
    _, paths, _ = prepared
    train, test = EmbeddingCache.open(paths["train"]), EmbeddingCache.open(paths["eval"]["heldout_designs"]["cache"])
    got = qs.prototype_baseline(paths["train"], paths["eval"]["heldout_designs"]["cache"])
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
    assert qs.prototype_baseline(paths["train"], paths["eval"]["heldout_both"]["cache"]) is None  # no seen concept


def test_quickstart_run_table_and_study_evaluation_agree(prepared):
    from littune.model import LiTModel
    from littune.trainer import Trainer

    root, paths, _ = prepared
    run = root / "run_lu"
    cfg = load_config(overrides=qs.train_overrides(paths, run, steps=6, batch=8, text_tower=TINY_TEXT,
                                                   embed_dim=16, image_tower=SPEC))
    cfg.progress = False
    Trainer(cfg).run()
    metrics = json.loads((run / "results.json").read_text())
    assert {"heldout_designs", "heldout_designs_retrieval", "heldout_concepts"} <= set(metrics)
    rows = qs.results_rows(paths, metrics)
    assert [r["split"] for r in rows] == list(paths["eval"])
    for r in rows:
        assert r["chance_acc1"] == pytest.approx(1 / r["classes"])
        assert 0 <= r["acc1"] <= r["acc5"] <= 1
    table = qs.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "heldout_designs" in table
    # The study's evaluator, reading the same caches, gives the trainer's validation numbers.
    model = LiTModel.from_pretrained(run / "model").eval()
    with torch.no_grad():
        again = study.evaluate(model, paths, locked=True)
    for split in paths["eval"]:
        assert again[split]["acc1"] == pytest.approx(metrics[split]["acc1"])
        for k, v in metrics[f"{split}_retrieval"].items():
            assert again[f"{split}_retrieval"][k] == pytest.approx(v)


def test_study_settings_train_the_right_towers(prepared):
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
    # A finished setting is read back, not trained again.
    assert study.run_setting("Uu", paths, root / "study", 4, 8, SPEC, progress=False, text_towers=towers) == row
    assert row["commit"] == qs._commit()  # each row says which code trained it
    table = study.markdown(
        [row], {"chance": {s: 0.0005 for s in paths["eval"]}, "image-only prototype (seen concepts)": {}})
    assert f"**Uu** | {row['commit']} |" in table and "| chance |" in table
    assert "| 0.0005 |" in table  # chance with 1,914 classes must not print as 0.001
