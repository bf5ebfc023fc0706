"""``mta_adapt``: k-shot inner-loop adaptation to each unseen tool before predicting (MTA + adapt).

For every gold tool of a set, its items are split into two folds by a seeded permutation; the
meta-learned LoRA is adapted on up to ``shots`` items of one fold (with their own shipped
candidates as the episode) and scores the other fold, and vice versa — so a scored item is never
in its own support set. The items of a tool are the same in every protocol seed file (only the
distractors differ), so adaptation runs once per (tool, fold) per group, with the first seed's
candidates as support episode. Tools with a single item have no support: that item is scored by
the meta-learned initialisation and counted in :attr:`AdaptScorer.fallbacks`.
"""
from __future__ import annotations

import functools
import zlib
from typing import Sequence

import jax
import numpy as np

from mta_jax import meta
from mta_jax.data import render
from mta_jax.eval.encoders import SharedBottomEncoder
from mta_jax.eval.sets import EvalSet
from mta_jax.meta import losses


class AdaptScorer:
    """A :data:`~mta_jax.eval.metrics.Scorer` that adapts LoRA per unseen tool (see module doc).

    Args:
      bank: the shared-bottom encoder (its ``first_layer`` must not exceed the LoRA's).
      settings: the trained run's settings (LoRA, meta-algorithm, training sequence lengths, scale).
      meta_params: the trained meta-parameters (``MetaState.params``).
      shots: support items per adaptation.
    """

    def __init__(self, bank: SharedBottomEncoder, settings, meta_params, shots: int):
        if shots < 1:
            raise ValueError(f"mta_adapt needs shots >= 1, got {shots}")
        self.bank, self.s, self.meta_params, self.shots = bank, settings, meta_params, shots
        self.fallbacks = 0
        loss = losses.BiEncoderLoss(bank.cfg, start=bank.first_layer, scale=settings.loss_scale)
        self._adapt = jax.jit(functools.partial(meta.adapt_for_eval, algo=settings.meta, loss_fn=loss,
                                                has_aux=True))
        self._init = meta.initial_params(meta_params, settings.meta)

    def _doc(self, eval_set: EvalSet, tool_id: str) -> str:
        return render.tool_text(eval_set.catalogue[tool_id], style=self.s.data.doc_style)

    def _bottoms(self, texts: list[str], max_len: int, rows: int):
        ids, mask = self.bank.tok.encode(texts, max_len)
        pad = rows - len(texts)
        ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
        return self.bank._bottom(self.bank.base, ids, mask), mask

    def _support(self, eval_set: EvalSet, items) -> dict:
        """One episode from support items: their candidates are the episode's docs."""
        c = max(len(it.candidates) for it in items)
        n = self.shots * c
        docs: dict[str, int] = {}
        cands = np.zeros((self.shots, c), np.int32)
        labels = np.zeros((self.shots,), np.int32)
        for i in range(self.shots):
            it = items[i % len(items)]  # fewer items than shots: repeat (fixed shapes)
            for j, t in enumerate(it.candidates):
                cands[i, j] = docs.setdefault(t, len(docs))
            labels[i] = it.candidates.index(it.gold[0])
        texts = [self._doc(eval_set, t) for t in docs]
        tool_h, tool_mask = self._bottoms(texts, self.s.data.doc_len, n)
        queries = [items[i % len(items)].query for i in range(self.shots)]
        query_h, query_mask = self._bottoms(queries, self.s.data.query_len, self.shots)
        return {"tool_h": tool_h, "tool_mask": tool_mask, "query_h": query_h, "query_mask": query_mask,
                "cands": cands, "label": labels}

    def __call__(self, group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
        first = group[0]
        for s in group[1:]:
            if [it.id for it in s.items] != [it.id for it in first.items]:
                raise ValueError(f"{s.name}: seed {s.seed} lists other items than seed {first.seed}")
        if any(it.candidates is None for it in first.items):
            raise ValueError(f"mta_adapt needs shipped candidates; {first.name} ranks the whole pool")
        by_tool: dict[str, list[int]] = {}
        for i, it in enumerate(first.items):
            by_tool.setdefault(it.gold[0], []).append(i)
        lora_of_item: dict[int, object] = {}
        adapted = []
        for tool, idx in sorted(by_tool.items()):
            if len(idx) < 2:
                self.fallbacks += len(idx)
                continue
            rng = np.random.default_rng((first.seed or 0, zlib.crc32(tool.encode("utf-8"))))
            perm = rng.permutation(idx)
            folds = (perm[: len(perm) // 2], perm[len(perm) // 2:])
            for k, scored in enumerate(folds):
                support_items = [first.items[i] for i in folds[1 - k][: self.shots]]
                lora = self._adapt(self.meta_params, self.bank.base, self._support(first, support_items))
                adapted.append(lora)
                for i in scored:
                    lora_of_item[int(i)] = len(adapted) - 1
        out = [[None] * len(s.items) for s in group]
        # Score per adapted LoRA (plus the un-adapted fallback): every text is embedded once per LoRA.
        plans = {a: [] for a in range(-1, len(adapted))}
        for i in range(len(first.items)):
            plans[lora_of_item.get(i, -1)].append(i)
        for a, items in plans.items():
            if not items:
                continue
            lora = self._init if a == -1 else adapted[a]
            texts: dict[str, int] = {}
            for s in group:
                for i in items:
                    it = s.items[i]
                    texts.setdefault(it.query, len(texts))
                    for t in it.candidates:
                        texts.setdefault(self._doc(s, t), len(texts))
            emb = self.bank.embed_fn(lora)(list(texts))
            if a != -1:
                self.bank.drop_embeddings(lora)  # used once: do not keep 2 x tools caches alive
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            for si, s in enumerate(group):
                for i in items:
                    it = s.items[i]
                    docs = [texts[self._doc(s, t)] for t in it.candidates]
                    out[si][i] = emb[docs] @ emb[texts[it.query]]
        return out


def adapt_scorer(bank: SharedBottomEncoder, settings, meta_params, shots: int) -> AdaptScorer:
    """Factory used by the evaluation wiring (``train/evaluate.py``)."""
    return AdaptScorer(bank, settings, meta_params, shots)
