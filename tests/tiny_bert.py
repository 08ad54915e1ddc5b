"""Tiny pre-trained-style text towers as Hugging Face folders (``config.json``, ``model.safetensors``,
tokenizer): what ``{"type": "hf", "path": DIR}`` loads, in a second instead of MiniLM's.

* ``wordpiece`` -- a BERT folder with a ``vocab.txt`` WordPiece tokenizer saved as ``BertTokenizer``, as
  all-MiniLM-L6-v2 has one (transformers rebuilds its normaliser from the class on every load);
* ``unigram`` -- a BERT network behind a sentencepiece-style Unigram tokenizer (Metaspace, ``<s> $A
  </s>``) saved as ``PreTrainedTokenizerFast``, as the e5-small conversion writes one
  (transformers keeps its ``tokenizer.json`` as it is).

Both tokenizers are trained on multi-script captions, so the words of the tests have tokens."""

from __future__ import annotations

from pathlib import Path

from conftest import CAPTIONS

WORDS = CAPTIONS + ["query: passage: a photo of a cat", "query: un chat noir", "passage: 猫が好きです"] * 5


def tiny_bert(directory: Path, kind: str = "wordpiece", seed: int = 0) -> Path:
    """A tiny BERT folder (2 layers, width 32) with a ``kind`` tokenizer in ``directory``; returns it."""
    import torch
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _wordpiece(directory) if kind == "wordpiece" else _unigram()
    tok.save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(directory)
    return directory


def _wordpiece(directory: Path):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(WORDS, vocab_size=400, min_frequency=1, show_progress=False)
    return BertTokenizer(vocab=trainer.get_vocab(), do_lower_case=True)


def _unigram():
    from littune.towers.text import train_tokenizer

    tok = train_tokenizer(WORDS, vocab_size=300, kind="unigram")
    assert tok.pad_token_id is not None
    return tok


def hf_model(folder: Path, setting: str = "LU", prefix: str | None = "query: ", context_length: int = 16):
    """A LiT model (the tiny image tower, embed_dim 16) over the hf text tower in ``folder``."""
    from littune import LiTConfig, LiTModel
    from littune.towers.tiny import SPEC

    text = {"type": "hf", "path": str(folder), "context_length": context_length,
            **({"prefix": prefix} if prefix is not None else {})}
    return LiTModel.from_config(LiTConfig(setting=setting, image_tower=SPEC, text_tower=text, embed_dim=16))
