"""Encoder embedding for evaluation: the frozen bottom is computed once per text and shared by all methods.

Zero-shot, FT and MTA differ only in the LoRA of the top ``L - first_layer`` layers, so every text's
hidden states after layer ``first_layer`` are computed once and each method runs just the adapted
top layers on them (at first_layer = 4 of 6, three methods cost 1.67 encoder passes instead of 3).
Both caches are keyed by text, so the SD and CD sets of a dataset (same queries, other distractors)
and the seeds of a protocol set embed each text once. Texts are bucketed by length so short texts
do not pay for long padding; every call of a bucket has the same rows (one compile per bucket).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from mta_jax.eval.methods import (DEFAULT_BATCH_TOKENS, DEFAULT_BUCKETS, EmbedFn, bucket_widths,
                                  length_batches, padded_token_batches)
from mta_jax.model import encoder


class SharedBottomEncoder:
    """Embeds texts as ``pool(top(bottom(text)))`` with per-text caches of ``bottom`` and of embeddings.

    Args:
      cfg, base: the encoder and its frozen weights.
      tokenizer: ``encode(texts, max_len) -> (ids, mask)``.
      first_layer: layers ``[0, first_layer)`` are shared (no LoRA may sit there).
      max_len: truncation length (256 = sentence-transformers' setting for MiniLM).
      batch_size: most rows per compiled call.
      buckets: padded lengths (see :func:`~mta_jax.eval.methods.make_embed_fn`).
      batch_tokens: cap on rows x bucket per call (None: always ``batch_size`` rows).
    """

    def __init__(self, cfg: encoder.EncoderConfig, base: dict, tokenizer, first_layer: int,
                 max_len: int = 256, batch_size: int = 64, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 batch_tokens: int | None = DEFAULT_BATCH_TOKENS):
        self.cfg, self.base, self.tok = cfg, base, tokenizer
        self.first_layer, self.max_len, self.batch_size = first_layer, max_len, batch_size
        self.batch_tokens = batch_tokens
        self.lens = bucket_widths(buckets, max_len)
        self._bottom = jax.jit(lambda b, i, m: encoder.run_layers(
            cfg, b, encoder.embed(cfg, b, i), m, stop=first_layer))
        self._top = jax.jit(lambda b, lora, h, m: encoder.pool(
            encoder.run_layers(cfg, b, h, m, lora=lora, start=first_layer), m))
        self._rows: dict[str, np.ndarray] = {}              # text -> bottom states [length, D]
        self._embeddings: dict[int, dict[str, np.ndarray]] = {}  # id(lora) -> text -> [D]
        self._loras: dict[int, object] = {}                 # keeps keyed LoRA trees alive

    def bottom_rows(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The frozen-bottom hidden states of each text (computed once per text)."""
        todo = sorted({t for t in texts if t not in self._rows})
        if todo:
            ids, mask = self.tok.encode(todo, self.max_len)
            lengths = mask.sum(1)
            for sel, b_ids, b_mask in padded_token_batches(ids, mask, self.lens, self.batch_size,
                                                           self.batch_tokens):
                h = np.asarray(self._bottom(self.base, b_ids, b_mask))
                for r, i in enumerate(sel):
                    self._rows[todo[i]] = h[r, :lengths[i]]
        return [self._rows[t] for t in texts]

    def embed_fn(self, lora=None) -> EmbedFn:
        """``texts -> [N, D]`` unit vectors with ``lora`` on the top layers (None = pretrained)."""
        key = id(lora)
        self._loras[key] = lora
        cache = self._embeddings.setdefault(key, {})

        def embed(texts: Sequence[str]) -> np.ndarray:
            texts = list(texts)
            if not texts:
                raise ValueError("embed_fn: no texts")
            todo = sorted({t for t in texts if t not in cache})
            if todo:
                rows = self.bottom_rows(todo)
                lengths = np.asarray([len(r) for r in rows])
                for sel, width, n_rows in length_batches(lengths, self.lens, self.batch_size,
                                                          self.batch_tokens):
                    h = np.zeros((n_rows, width, self.cfg.hidden_size), np.float32)
                    m = np.zeros((n_rows, width), np.int32)
                    for r, i in enumerate(sel):
                        h[r, :lengths[i]], m[r, :lengths[i]] = rows[i], 1
                    e = np.asarray(self._top(self.base, lora, h, m))
                    for r, i in enumerate(sel):
                        cache[todo[i]] = e[r]
            return np.stack([cache[t] for t in texts])
        return embed

    def drop_embeddings(self, lora) -> None:
        """Frees the embedding cache of one LoRA tree (e.g. a per-tool adapted one)."""
        self._embeddings.pop(id(lora), None)
        self._loras.pop(id(lora), None)
