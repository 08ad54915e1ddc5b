"""A pre-trained (hf) text tower that trains (LU, UU): its word-embedding table frozen by default (no
gradient, no optimiser state, never moves) as the ``text_embeddings`` group of ``optim.lr_mults``, and
the rest of it at 0.1x unless the config sets ``optim.lr_mults.text``; a from-scratch tower unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_bert import hf_model, tiny_bert

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TINY, make_source  # noqa: E402

from littune.config import OptimSection, load_config  # noqa: E402
from littune.errors import ConfigError  # noqa: E402
from littune.train.losses import ContrastiveLoss  # noqa: E402
from littune.train.optim import build_optimizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert", "wordpiece")


def _step(model, opt):
    """One optimiser step on a contrastive loss over four captions and random pixels."""
    toks = model.tokenize(["a red apple", "un chat noir", "猫が好きです", "a black dog"])
    img, txt = model(**toks, pixels=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    opt.zero_grad()
    ContrastiveLoss()(img, txt, model.logit_scale).backward()
    opt.step()


def _lrs(opt) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


@pytest.mark.parametrize("setting", ["LU", "UU"])
def test_word_embeddings_are_frozen_by_default_no_grad_no_state_unchanged_while_the_rest_of_the_tower_trains(
        folder, setting):
    model = hf_model(folder, setting=setting).train()
    words = model.text_tower.word_embeddings()
    before = {n: p.detach().clone() for n, p in model.text_tower.named_parameters()}
    opt = build_optimizer(model, OptimSection(name="adamw", lr=1e-2))
    assert not words.requires_grad
    assert all(p is not words for g in opt.param_groups for p in g["params"])
    assert "text_embeddings" not in _lrs(opt)
    _step(model, opt)
    assert words.grad is None and words not in opt.state
    after = dict(model.text_tower.named_parameters())
    assert torch.equal(after["net.embeddings.word_embeddings.weight"], before["net.embeddings.word_embeddings.weight"])
    moved = [n for n, p in after.items() if not torch.equal(p, before[n])]
    assert "net.embeddings.position_embeddings.weight" in moved and len(moved) > 10  # the rest of the tower trains
    model.hold({"text"})  # delayed unlocking holds the text tower, then releases it: the table stays frozen
    model.hold(frozenset())
    assert not words.requires_grad and next(model.text_tower.net.encoder.parameters()).requires_grad


def test_lr_mults_text_embeddings_trains_the_word_embeddings(folder):
    model = hf_model(folder, setting="LU").train()
    words = model.text_tower.word_embeddings()
    before = words.detach().clone()
    opt = build_optimizer(model, OptimSection(name="adamw", lr=1e-2, lr_mults={"text_embeddings": 1.0}))
    assert words.requires_grad and _lrs(opt)["text_embeddings"] == pytest.approx(1e-2)
    assert _lrs(opt)["text"] == pytest.approx(1e-3)  # the rest keeps LU's 0.1
    _step(model, opt)
    assert words in opt.state and not torch.equal(words, before)


def test_lu_gives_a_pretrained_text_tower_0_1_unless_the_config_sets_text(folder, tiny_model):
    lu = build_optimizer(hf_model(folder, setting="LU"), OptimSection(lr=1e-3))
    assert _lrs(lu)["text"] == pytest.approx(1e-4) and _lrs(lu)["text_no_decay"] == pytest.approx(1e-4)
    assert _lrs(lu)["head"] == pytest.approx(1e-3)
    uu = build_optimizer(hf_model(folder, setting="UU"), OptimSection(lr=1e-3))
    assert _lrs(uu)["text"] == pytest.approx(1e-4) and _lrs(uu)["image"] == pytest.approx(1e-3)
    full = build_optimizer(hf_model(folder, setting="LU"), OptimSection(lr=1e-3, lr_mults={"text": 1.0}))
    assert _lrs(full)["text"] == pytest.approx(1e-3) and "text_embeddings" not in _lrs(full)
    # A text tower from scratch: 1x, its token embeddings in `text`; an hf network from random init (u) too.
    scratch = build_optimizer(tiny_model("Lu"), OptimSection(lr=1e-3))
    assert _lrs(scratch)["text"] == pytest.approx(1e-3) and "text_embeddings" not in _lrs(scratch)
    random_hf = build_optimizer(hf_model(folder, setting="Lu"), OptimSection(lr=1e-3))
    assert _lrs(random_hf)["text"] == _lrs(random_hf)["text_embeddings"] == pytest.approx(1e-3)


@pytest.mark.parametrize("mults,message", [
    ("{text_embedings: 1}", "^optim.lr_mults.text_embedings: unknown group; did you mean optim.lr_mults.text_embeddings"
                            r"\? use image, text, text_embeddings, head$"),
    ("{txt: 1}", "^optim.lr_mults.txt: unknown group; did you mean optim.lr_mults.text\\?"),
    ("{text_embeddings: fast}", "^optim.lr_mults.text_embeddings: expected a number >= 0, got 'fast'$"),
    ("{text: -1}", "^optim.lr_mults.text: expected a number >= 0, got -1$"),
])
def test_lr_mults_keys_and_values_are_one_line_config_errors(folder, mults, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=["data.cache=x", "model.setting=LU", f"model.text_tower={{type: hf, path: {folder}}}",
                               f"optim.lr_mults={mults}"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^optim.lr_mults.text_embeddings: only an hf text tower"):
        load_config(overrides=["data.cache=x", "model.setting=Lu", "model.text_tower={type: transformer}",
                               "optim.lr_mults={text_embeddings: 1}"])  # a transformer tower


def test_lu_training_says_which_multipliers_apply_and_leaves_the_word_embeddings_as_they_were(folder, tmp_path, capsys):
    from littune import LiTModel
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data", per_class=1)
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path / 'run'}", f"data.source={src}", "steps=3",
                                        "model.setting=LU", f"model.text_tower={{type: hf, path: {folder}, "
                                        "context_length: 12}", f"data.cache={tmp_path / 'cache'}"])
    Trainer(cfg).run()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "learning-rate multipliers" in ln]
    assert lines == ["littune train: learning-rate multipliers (optim.lr_mults): image 0 (locked), text 0.1 (LU's "
                     "default for a pre-trained text tower), text_embeddings 0 (frozen: LU's default for a pre-trained "
                     "text tower), head 1"]
    log = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_text"] / r["lr"] for r in log] == pytest.approx([0.1] * 3)
    assert all("lr_text_embeddings" not in r for r in log)
    trained = LiTModel.from_pretrained(tmp_path / "run" / "model")
    start = hf_model(folder, setting="LU")
    assert torch.equal(trained.text_tower.word_embeddings(), start.text_tower.word_embeddings())
    assert not torch.equal(trained.text_tower.net.encoder.layer[0].output.dense.weight,
                           start.text_tower.net.encoder.layer[0].output.dense.weight)
