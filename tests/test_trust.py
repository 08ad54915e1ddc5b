"""A model folder is data: loading one never imports or calls code it names, unless the user opts in.

The hostile folder is a real saved model whose ``config.json`` names, as its image tower, the torch
factory ``subprocess:check_call`` with arguments that write a marker file (the PoC of issue 23).
Every way of loading a model -- ``littune.load``, the open_clip API, ``classify``, ``eval``,
``index``, ``export``, ``serve`` and the model an ``index.json`` records (``search``, ``serve
--index``) -- refuses it with one line that names the code and ``--trust-code``, and the marker is
never written. A folder whose Hugging Face config or tokenizer asks (``auto_map``) to run the
Python file beside it is refused too, without transformers' interactive prompt. With
``trust_code=True`` (``--trust-code``) a user's own torch factory tower loads and gives the same
embeddings.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import littune
from littune.cli import main
from littune.errors import LittuneError, UntrustedCodeError

pytestmark = pytest.mark.usefixtures("one_thread")

POC = {"type": "torch", "factory": "subprocess:check_call", "kwargs": {"args": ["sh", "-c", "id > PWNED"]}}
OWN = {"type": "torch", "factory": "test_trust:own_cnn", "kwargs": {"width": 6},
       "preprocess": {"size": 32, "resize": 32}}


def own_cnn(width: int = 4) -> nn.Module:
    """The user's own tower factory (a module on the path, not littune's)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU())


def _images(root):
    rng = np.random.default_rng(0)
    for cls in ("red", "blue"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    return root


def _hostile_copy(good, where):
    """``good`` copied to ``where``, its config.json naming the PoC as a tower that is not by reference."""
    shutil.copytree(good, where)
    meta = json.loads((where / "config.json").read_text())
    meta["config"]["image_tower"] = POC
    meta["image_tower_by_reference"] = False
    (where / "config.json").write_text(json.dumps(meta))
    return where


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from littune.search import build_index
    from littune.towers.tiny import SPEC

    from conftest import CAPTIONS, TINY_TEXT

    root = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    model = littune.LiTModel.from_config(littune.LiTConfig(
        setting="Lu", image_tower=dict(SPEC),
        text_tower=dict(TINY_TEXT), embed_dim=16), captions=CAPTIONS)
    model.save_pretrained(root / "good")
    imgs = _images(root / "imgs")
    (root / "pairs.csv").write_text("image,caption\n" + "".join(
        f"imgs/{c}/{k}.png,a {c} thing\n" for c in ("red", "blue") for k in range(2)))
    _hostile_copy(root / "good", root / "hostile")
    # An index built with a good model whose folder then turns hostile: the path index.json records.
    shutil.copytree(root / "good", root / "recorded")
    build_index(littune.load(root / "recorded"), str(imgs), root / "idx", model_dir=root / "recorded",
                progress=False, workers=0)
    shutil.rmtree(root / "recorded")
    _hostile_copy(root / "good", root / "recorded")
    return root


def _one_line_refusal(capsys, command, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"littune {command}: error: ")
    assert "subprocess:check_call" in line and "--trust-code" in line, line
    return line


@pytest.mark.parametrize("how", ["load", "from_pretrained", "open_clip"])
def test_loading_a_hostile_folder_through_the_api_runs_nothing(world, tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    load = {"load": littune.load, "from_pretrained": littune.LiTModel.from_pretrained,
            "open_clip": littune.create_model_from_pretrained}[how]
    with pytest.raises(UntrustedCodeError) as e:
        load(world / "hostile")
    msg = str(e.value)
    assert "\n" not in msg and "subprocess:check_call" in msg and "trust_code=True" in msg
    assert str(world / "hostile" / "config.json") in msg
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("command,argv", [
    ("classify", ["classify", "--model", "{H}", "{I}/red/0.png", "--labels", "red,blue"]),
    ("eval", ["eval", "zeroshot", "{I}", "--model", "{H}", "-q"]),
    ("eval", ["eval", "retrieval", "{W}/pairs.csv", "--model", "{H}", "-q"]),
    ("index", ["index", "{I}", "--model", "{H}", "--out", "{T}/out.index", "-q"]),
    ("export", ["export", "{H}", "--out", "{T}/onnx"]),
    ("serve", ["serve", "--model", "{H}", "--port", "8123"]),
    ("search", ["search", "--index", "{W}/idx", "red"]),
    ("serve", ["serve", "--index", "{W}/idx", "--port", "8123"]),
], ids=["classify", "eval-zeroshot", "eval-retrieval", "index", "export", "serve", "search-recorded",
        "serve-recorded"])
def test_every_command_refuses_a_hostile_folder_in_one_line(world, tmp_path, monkeypatch, capsys, command, argv):
    pytest.importorskip("fastapi") if command == "serve" else None
    monkeypatch.chdir(tmp_path)
    subs = {"{H}": str(world / "hostile"), "{I}": str(world / "imgs"), "{W}": str(world), "{T}": str(tmp_path)}
    for k, v in subs.items():
        argv = [a.replace(k, v) for a in argv]
    line = _one_line_refusal(capsys, command, argv)
    assert "hostile" in line or "recorded" in line
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out.index").exists() and not (tmp_path / "onnx").exists()


def test_a_users_own_torch_tower_loads_with_trust_code(tmp_path, monkeypatch, capsys):
    from conftest import CAPTIONS, TINY_TEXT

    torch.manual_seed(0)
    model = littune.LiTModel.from_config(littune.LiTConfig(setting="Lu", image_tower=OWN, text_tower=dict(TINY_TEXT),
                                                           embed_dim=16), captions=CAPTIONS).eval()
    model.save_pretrained(tmp_path / "own")
    with pytest.raises(UntrustedCodeError, match="test_trust:own_cnn"):
        littune.load(tmp_path / "own")
    again = littune.load(tmp_path / "own", trust_code=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), model.encode_image(x))
    # The command line: refused without --trust-code, classified with it.
    img = _images(tmp_path / "imgs") / "red" / "0.png"
    argv = ["classify", "--model", str(tmp_path / "own"), str(img), "--labels", "red,blue", "--json"]
    assert "test_trust:own_cnn" in _refusal_line(capsys, argv)
    assert main(argv + ["--trust-code"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == str(img)


def _refusal_line(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_the_trainer_never_builds_code_a_cache_manifest_names(tmp_path, monkeypatch):
    """An embedding cache is data too: a manifest whose tower_spec is the PoC (its fingerprint left as
    the configured tower's) is refused before training, and nothing runs at the export."""
    from data_fixtures import tiny_tower_arg
    from test_trainer import TINY, make_source

    from littune.config import load_config
    from littune.train.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    src, cache = make_source(tmp_path / "data", per_class=1), tmp_path / "cache"
    assert main(["embed", str(src), "--out", str(cache), "--tower", tiny_tower_arg(), "--workers", "0", "-q"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["tower_spec"] = POC
    (cache / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path / 'run'}", f"data.cache={cache}", "steps=2",
                                        "data.batch_size=8"])
    with pytest.raises(UntrustedCodeError, match="subprocess:check_call") as e:
        Trainer(cfg).run()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_embed_refuses_a_tower_spec_file_naming_code_but_runs_a_typed_spec(world, tmp_path, monkeypatch, capsys):
    """``--tower FILE.json`` (as ``littune tower`` writes beside a graph, made to travel) is data; the
    same spec typed on the command line is the user's own."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.tower.json").write_text(json.dumps(POC))
    argv = ["embed", str(world / "imgs"), "--out", str(tmp_path / "cache"), "--workers", "0", "-q"]
    line = _one_line_refusal(capsys, "embed", argv + ["--tower", str(tmp_path / "evil.tower.json")])
    assert "evil.tower.json" in line and not (tmp_path / "PWNED").exists()
    (tmp_path / "own.tower.json").write_text(json.dumps(OWN))
    assert main(argv + ["--tower", json.dumps(OWN)]) == 0  # typed: runs
    assert main(argv[:3] + [str(tmp_path / "c2"), *argv[4:], "--tower", str(tmp_path / "own.tower.json"),
                           "--trust-code"]) == 0


def test_littunes_own_tiny_tower_needs_no_trust(world):
    """A factory littune ships (numbers in, a network out) is not code a folder brings."""
    model = littune.load(world / "good")
    assert model.image_tower.name.startswith("torch:littune.towers.tiny:tiny_cnn#")  # the pooling and arguments follow


# -- Hugging Face folders that ask to run their own Python (auto_map) ---------------------------------
EVIL_PY = """
import pathlib
pathlib.Path("PWNED").write_text("ran")
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _prompts(monkeypatch):
    """transformers' "Do you wish to run the custom code? [y/N]", answered yes, and counted."""
    asked = []

    def answer(prompt=""):
        asked.append(prompt)
        return "y"

    monkeypatch.setattr("builtins.input", answer)
    return asked


def test_an_hf_image_tower_folder_with_auto_map_is_refused_without_a_prompt(tmp_path, monkeypatch, world):
    monkeypatch.chdir(tmp_path)
    asked = _prompts(monkeypatch)
    folder = tmp_path / "m"
    shutil.copytree(world / "good", folder)
    (folder / "image_tower").mkdir()
    (folder / "image_tower" / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (folder / "image_tower" / "evil.py").write_text(EVIL_PY)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["image_tower"] = {"type": "hf", "path": "image_tower", "relative": True, "pooling": "cls"}
    (folder / "config.json").write_text(json.dumps(meta))
    for trust in (False, True):  # trust_code never extends to a Hugging Face folder's own Python
        with pytest.raises(LittuneError) as e:
            littune.load(folder, **({"trust_code": True} if trust else {}))
        assert "\n" not in str(e.value) and "auto_map" in str(e.value)
    assert asked == [] and not (tmp_path / "PWNED").exists()


def test_an_hf_text_folder_with_auto_map_is_refused_without_a_prompt(tmp_path, monkeypatch):
    """The text tower's folder (``text/`` of a model with an ``hf`` text tower): a config.json and a
    tokenizer_config.json that name the Python file beside them."""
    from transformers import BertTokenizerFast

    from littune.towers.text import build_text_tower

    monkeypatch.chdir(tmp_path)
    asked = _prompts(monkeypatch)
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "evil", "hidden_size": 8,
         "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(EVIL_PY)
    with pytest.raises(LittuneError) as e:
        build_text_tower({"type": "hf"}, pretrained=False, base_dir=folder)
    assert "\n" not in str(e.value) and "auto_map" in str(e.value) and str(folder) in str(e.value)
    assert asked == [] and not (tmp_path / "PWNED").exists()
