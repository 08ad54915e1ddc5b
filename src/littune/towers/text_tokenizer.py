"""Text towers' tokenizers: one trained on the captions (:func:`train_tokenizer`), a pre-trained
folder's (:func:`load_hf_tokenizer`), and a prefix put before every text (:func:`with_prefix`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable


SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, kind: str = "bpe", min_frequency: int = 2):
    """Train a tokenizer on captions; returns a ``transformers.PreTrainedTokenizerFast``.

    NFKC + lower-casing, then byte-level BPE (never an unknown token, any script) or Unigram
    (Metaspace pre-tokenizer, SentencePiece-style). Every sequence becomes ``<s> ... </s>``.
    The trainer's progress bar shows on a terminal only (elsewhere it wrote blank lines to stdout).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=_terminal(),
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token=SPECIAL_TOKENS["unk_token"], show_progress=_terminal())
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'unigram'")
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.train_from_iterator(_batches(t for t in texts if t), trainer=trainer)
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _batches(texts: Iterable[str], size: int = 4096):
    """Lists of ``size`` texts: the trainer counts a list's words in parallel (2.2 s less for the main
    job's 432k captions; the counts, and so the tokenizer, are the same)."""
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _terminal() -> bool:
    """Whether stdout is a terminal (where the tokenizer trainer draws its progress bar)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def load_hf_tokenizer(path: str | Path, prefix: str | None = None):
    """The tokenizer of the Hugging Face folder ``path`` (offline), with ``prefix`` (:func:`with_prefix`)."""
    from transformers import AutoTokenizer

    from .._hf import quiet_transformers

    from .trust import NO_REMOTE_CODE, remote_code_refusal

    quiet_transformers()
    try:  # a tokenizer_config.json asking to run its own Python (auto_map) is refused
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **NO_REMOTE_CODE)
    except ValueError as e:
        raise remote_code_refusal(f"the tokenizer in {path}", e) or e from None
    return with_prefix(tokenizer, prefix)


def with_prefix(tokenizer, prefix: str | None):
    """``tokenizer`` (changed in place) putting ``prefix`` before every text: a ``Prepend`` normaliser
    first in its backend's normaliser, which ``tokenizer.json`` carries and tokenizers.js runs too.

    The ids are those of ``prefix + text`` (truncation counts the prefix's tokens), except that the
    tokenizer puts the prefix before each stretch of text between special-token strings written in
    the text (``"a [MASK] b"``) and before nothing in an empty text. A tokenizer whose normaliser
    begins with this prefix already (one saved with it, and kept as is on loading) is left alone:
    loading a saved model never doubles it. ``transformers`` rebuilds some tokenizers' normalisers
    from their class (``BertTokenizer``), dropping it: the tower puts it back from its spec."""
    if not prefix:
        return tokenizer
    if not isinstance(prefix, str):
        raise ValueError(f"text prefix must be a string such as 'query: ', not {prefix!r}")
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    norm = backend.normalizer
    if norm is None:
        parts = []
    elif isinstance(norm, normalizers.Sequence):
        parts = [norm[i] for i in range(len(norm))]
    else:
        parts = [norm]
    if parts and isinstance(parts[0], normalizers.Prepend) and parts[0].prepend == prefix:
        return tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(prefix), *parts])
    return tokenizer
