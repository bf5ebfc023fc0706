"""Tool-selection methods for evaluation: random, BM25 and embedding scorers (zero-shot and LoRA-adapted).

A method is a :data:`~mta_jax.eval.metrics.Scorer`: given the sets of one group (e.g. five
protocol seeds) it returns, per set, per item, one score per candidate (or per catalogue tool for
``candidates=None`` items). :data:`METHODS` maps method names to factories taking a
:class:`MethodContext`; trained methods (``mta``, ``ft``, ``mta_adapt``) are added by whoever owns
the trained LoRA tree, through :func:`encoder_method`.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import zlib
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mta_jax.data.render import tool_text
from mta_jax.eval import bm25
from mta_jax.eval.metrics import Scorer
from mta_jax.eval.sets import EvalItem, EvalSet

EmbedFn = Callable[[Sequence[str]], np.ndarray]
# Sequence-length buckets for the encoder: a text is padded to the smallest bucket that holds it,
# so short tool docs do not pay for 256-token attention. max_len is always the last bucket. Steps
# of ~1.5x keep padding near 20% of the tokens on the nine eval sets (2x steps: 42%); each bucket
# costs one ~0.4 s compile per function.
DEFAULT_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256)
# Rows per encoder call are capped so that rows x width stays near this many tokens: long buckets
# get fewer rows, so their last, partly empty batch wastes less.
DEFAULT_BATCH_TOKENS = 8192


def _targets(eval_set: EvalSet, item: EvalItem) -> tuple[str, ...]:
    return item.candidates if item.candidates is not None else tuple(eval_set.catalogue.ids())


def random_scorer(seed: int = 0) -> Scorer:
    """Uniform random choice: i.i.d. uniform scores, drawn from ``default_rng([seed, crc32(label)])``.

    Each set (and each protocol seed) gets its own stream, so adding sets never changes another
    set's draws.
    """
    def score(group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
        out = []
        for s in group:
            rng = np.random.default_rng([seed, zlib.crc32(s.label.encode("utf-8"))])
            out.append([rng.random(len(_targets(s, it))) for it in s.items])
        return out
    return score


def bm25_scorer(config: bm25.BM25Config = bm25.BM25Config(),
                render: Callable = tool_text) -> Scorer:
    """BM25 of the query against rendered tool docs; idf and avgdl over the set's whole catalogue."""
    def score(group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
        indexes: dict[int, tuple[bm25.BM25Index, dict[str, int]]] = {}
        out = []
        for s in group:
            key = id(s.catalogue)  # seeds of a group share one catalogue: index it once
            if key not in indexes:
                idx = bm25.build_index(s.catalogue.ids(), [render(t) for t in s.catalogue.tools], config)
                indexes[key] = (idx, idx.position())
            idx, pos = indexes[key]
            out.append([bm25.score(idx, it.query, [pos[t] for t in _targets(s, it)]) for it in s.items])
        return out
    return score


def unique_texts(groups: Sequence[Sequence[EvalSet]], render: Callable = tool_text) -> list[str]:
    """Every query and rendered candidate doc of ``groups``, each once, in first-seen order."""
    return list(dict.fromkeys(t for g in groups for t in _group_texts(g, render)[0]))


def _group_texts(group: Sequence[EvalSet], render: Callable) -> tuple[dict, dict]:
    """Every unique text of a group: ``({text: index}, {(catalogue id, tool id): doc text})``."""
    texts: dict[str, int] = {}
    doc_text: dict[tuple[int, str], str] = {}
    for s in group:
        for it in s.items:
            texts.setdefault(it.query, len(texts))
            for t in _targets(s, it):
                k = (id(s.catalogue), t)
                if k not in doc_text:
                    doc_text[k] = render(s.catalogue[t])
                    texts.setdefault(doc_text[k], len(texts))
    return texts, doc_text


class EmbeddingScorer:
    """Cosine between the query embedding and each rendered tool doc's embedding.

    Each unique text (query or doc) is embedded once per scorer and kept: :meth:`prepare` embeds the
    texts of *all* eval sets in one ``embed_fn`` call before scoring starts (so length buckets fill
    whole batches instead of one partial batch per set), and the seeds of a protocol set, or the SD
    and CD sets of one dataset, reuse the same embeddings.

    Args:
      embed_fn: ``texts -> [N, D]`` embeddings (re-normalised here, so cosine = dot product).
      render: tool -> doc text (default ``"{name}: {description}"``, the reference rendering).
    """

    def __init__(self, embed_fn: EmbedFn, render: Callable = tool_text):
        self.embed_fn, self.render = embed_fn, render
        self._cache: dict[str, np.ndarray] = {}

    def _embed(self, texts: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if not todo:
            return
        emb = np.asarray(self.embed_fn(todo), dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != len(todo):
            raise ValueError(f"embed_fn returned shape {emb.shape} for {len(todo)} texts")
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self._cache.update(zip(todo, emb))

    def prepare(self, groups: Sequence[Sequence[EvalSet]]) -> None:
        """Embeds the texts of every group at once (optional; scoring embeds what is missing)."""
        self._embed(unique_texts(groups, self.render))

    def __call__(self, group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
        texts, doc_text = _group_texts(group, self.render)
        self._embed(list(texts))
        emb = np.stack([self._cache[t] for t in texts])
        out = []
        for s in group:
            rows = []
            for it in s.items:
                docs = [texts[doc_text[(id(s.catalogue), t)]] for t in _targets(s, it)]
                rows.append(emb[docs] @ emb[texts[it.query]])
            out.append(rows)
        return out


def embedding_scorer(embed_fn: EmbedFn, render: Callable = tool_text) -> EmbeddingScorer:
    """An :class:`EmbeddingScorer` (cosine of query and doc embeddings) over ``embed_fn``."""
    return EmbeddingScorer(embed_fn, render)


def batch_rows(width: int, batch_size: int, batch_tokens: int | None) -> int:
    """Rows per call for texts padded to ``width``: ``batch_size``, capped at ``batch_tokens`` tokens."""
    return batch_size if not batch_tokens else max(1, min(batch_size, batch_tokens // width))


def length_batches(lengths: np.ndarray, widths: Sequence[int], batch_size: int,
                   batch_tokens: int | None = None):
    """Yields ``(rows, width, n_rows)``: row indices grouped into batches padded to the smallest
    width in ``widths`` (sorted) that holds them, shortest first; a batch holds at most
    ``n_rows = batch_rows(width, batch_size, batch_tokens)`` texts and is padded to that many rows,
    so every (width, n_rows) pair is one compiled shape."""
    bucket_of = np.searchsorted(widths, lengths)  # smallest bucket >= length
    for b_idx, width in enumerate(widths):
        rows = np.flatnonzero(bucket_of == b_idx)
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        n_rows = batch_rows(width, batch_size, batch_tokens)
        for start in range(0, len(rows), n_rows):
            yield rows[start:start + n_rows], width, n_rows


def bucket_widths(buckets: Sequence[int], max_len: int) -> list[int]:
    """The padded lengths in use: ``buckets`` below ``max_len``, then ``max_len`` itself."""
    return sorted({b for b in buckets if b < max_len} | {max_len})


def padded_token_batches(ids: np.ndarray, mask: np.ndarray, widths: Sequence[int], batch_size: int,
                         batch_tokens: int | None):
    """Yields ``(rows, ids, mask)``: the tokenised texts in :func:`length_batches` order, each batch
    zero-padded to its bucket width and row count (one compiled shape per bucket)."""
    for sel, width, n_rows in length_batches(mask.sum(1), widths, batch_size, batch_tokens):
        b_ids = np.zeros((n_rows, width), np.int32)
        b_mask = np.zeros((n_rows, width), np.int32)
        w = min(width, ids.shape[1])
        b_ids[:len(sel), :w], b_mask[:len(sel), :w] = ids[sel, :w], mask[sel, :w]
        yield sel, b_ids, b_mask


def make_embed_fn(apply_fn: Callable[[np.ndarray, np.ndarray], Any], tokenizer, max_len: int = 256,
                  batch_size: int = 64, buckets: Sequence[int] = DEFAULT_BUCKETS,
                  batch_tokens: int | None = DEFAULT_BATCH_TOKENS) -> EmbedFn:
    """Turns a batched ``(ids, mask) -> [B, D]`` model into a length-bucketed ``texts -> [N, D]``.

    Texts are tokenised (truncated to ``max_len`` tokens, special tokens included), sorted by
    length and padded to the smallest bucket holding them; every batch of a bucket is padded to the
    same number of rows (:func:`batch_rows`), so a jitted ``apply_fn`` compiles once per bucket.
    Padding is masked out, so the embeddings do not depend on the bucketing (up to float rounding).

    Args:
      apply_fn: model on int32 ``ids``/``mask`` of shape ``(rows, bucket)``.
      tokenizer: has ``encode(texts, max_len) -> (ids, mask)`` (int32 NumPy, right padded).
      max_len: truncation length in tokens.
      batch_size: most rows per model call.
      buckets: candidate padded lengths (those above ``max_len`` are dropped; ``max_len`` added).
      batch_tokens: cap on rows x bucket per call (None: always ``batch_size`` rows).
    """
    lens = bucket_widths(buckets, max_len)

    def embed_fn(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            raise ValueError("embed_fn: no texts")
        ids, mask = tokenizer.encode(texts, max_len)
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        if ids.shape[0] != len(texts) or ids.shape[1] > max_len:
            raise ValueError(f"tokenizer returned ids of shape {ids.shape} for {len(texts)} texts "
                             f"at max_len={max_len}")
        out = None
        for sel, b_ids, b_mask in padded_token_batches(ids, mask, lens, batch_size, batch_tokens):
            e = np.asarray(apply_fn(b_ids, b_mask))[:len(sel)]
            if out is None:
                out = np.zeros((len(texts), e.shape[-1]), e.dtype)
            out[sel] = e
        return out

    return embed_fn


def make_encoder_embed_fn(cfg, params, tokenizer, lora=None, max_len: int = 256,
                          batch_size: int = 64, buckets: Sequence[int] = DEFAULT_BUCKETS,
                          batch_tokens: int | None = DEFAULT_BATCH_TOKENS) -> EmbedFn:
    """:func:`make_embed_fn` over ``model.encoder.encode`` (mean pooled, unit norm), jitted once.

    Args:
      cfg, params: encoder config and base parameters (``encoder.load_default()``).
      tokenizer: a ``data.tokenize.Tokenizer`` for the same model.
      lora: optional ``LoRAParams`` (trained methods); None = the pretrained encoder.
      max_len, batch_size, buckets, batch_tokens: see :func:`make_embed_fn`.
    """
    from mta_jax.model import encoder  # deferred: BM25/random evaluation needs no model code

    encode = jax.jit(functools.partial(encoder.encode, cfg))
    return make_embed_fn(lambda ids, mask: encode(params, ids, mask, lora), tokenizer, max_len,
                         batch_size, buckets, batch_tokens)


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a method factory may need.

    Attributes:
      config: the experiment config (``ml_collections.ConfigDict``) or None.
      workdir: the run's work directory (trained methods restore their LoRA tree from it).
      data_dir: the data root.
      model_dir: encoder weights folder; None = the installed all-MiniLM-L6-v2.
      batch_size: rows per encoder call.
    """

    config: Any = None
    workdir: pathlib.Path | None = None
    data_dir: pathlib.Path | None = None
    model_dir: pathlib.Path | None = None
    batch_size: int = 64


def encoder_method(ctx: MethodContext, lora=None) -> Scorer:
    """Embedding scorer over the context's encoder, optionally LoRA-adapted (zero-shot if None)."""
    from mta_jax.data.tokenize import Tokenizer
    from mta_jax.model import encoder

    model_dir = ctx.model_dir or encoder.default_model_dir()
    cfg, params = encoder.load_hf(model_dir)
    embed_fn = make_encoder_embed_fn(cfg, params, Tokenizer.from_dir(model_dir), lora,
                                     batch_size=ctx.batch_size)
    return embedding_scorer(embed_fn)


MethodFactory = Callable[[MethodContext], Scorer]

METHODS: dict[str, MethodFactory] = {
    "random": lambda ctx: random_scorer(0),
    "bm25": lambda ctx: bm25_scorer(),
    "zero_shot": encoder_method,
}
