"""``mta_adapt``: k-shot inner-loop adaptation to the unseen tools before predicting (MTA + adapt).

The items of a set are split into two folds: each gold tool's items are divided by a seeded
permutation. The meta-learned LoRA is adapted once per fold with the inner loop of training on a
support set drawn from the *other* fold — up to ``shots`` items of every unseen tool, round-robin
over the tools up to ``max_support`` items, each with its own shipped candidates — and that one
adapted LoRA scores every item of the fold. So a scored item is never in its support set, and the
model that scores an item does not depend on the item's gold tool: the adaptation is a k-shot,
N-way adaptation to the whole unseen tool set, as a deployment would do it with a few labelled
queries per new tool.

(Sessions 1-2 adapted one LoRA per gold tool and scored each item with the LoRA of its own gold
tool: that selected the model by the answer and inflated ``mta_adapt``/``ft_adapt`` by 5 points on
MetaTool and 34 on ToolLens. ``tests/test_eval_adapt.py`` checks that the gold labels of the scored
items cannot change their scores.)

``mta_tta`` / ``ft_tta`` (``support="unlabelled"``) adapt without any label: the items are split into
two halves by a seeded permutation (not by gold tool), each half's LoRA is adapted on up to
``max_support`` of the *other* half's queries with their shipped candidates and the support label
-1, so the inner loss is the entropy of their candidate distribution (test-time adaptation on
unlabelled queries, as a deployment sees them before any feedback).

``mta_docs`` / ``ft_docs`` (``support="docs"``) adapt from the unseen tools' documentation alone:
every tool that appears among the set's candidates becomes one pseudo-item whose query is its own
description (:func:`mta_jax.data.render.pseudo_query`) and whose candidates are it and ``C-1``
other tools of the set (seeded); one adapted LoRA scores every item (no query text or label is used).

The items are the same in every protocol seed file of a set (only the distractors differ), so the
folds and support sets come from the first seed file and serve all of them.
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Sequence

import jax
import numpy as np

from mta_jax import meta
from mta_jax.data import render
from mta_jax.eval import methods as methods_lib
from mta_jax.eval.encoders import SharedBottomEncoder
from mta_jax.eval.sets import EvalItem, EvalSet
from mta_jax.meta import losses

SUPPORTS = ("labelled", "unlabelled", "docs")
DEFAULT_MAX_SUPPORT = 256  # support items per adaptation (MetaTool's 37 test tools x 5 shots fit)
# Support doc rows are padded to a multiple of this (fewer distinct shapes to compile across sets).
_PAD = 32


def _round_up(n: int, m: int = _PAD) -> int:
    return max(m, -(-n // m) * m)


class AdaptScorer:
    """A :data:`~mta_jax.eval.metrics.Scorer` that adapts LoRA to the unseen tools (see module doc).

    Args:
      bank: the shared-bottom encoder (its ``first_layer`` must not exceed the LoRA's).
      settings: the trained run's settings (LoRA, meta-algorithm, training sequence lengths, scale).
      meta_params: the trained meta-parameters (``MetaState.params``).
      shots: support items per unseen tool.
      max_support: most support items per adaptation (bounds memory on large tool sets).
      support: ``"labelled"`` (k-shot, above), ``"unlabelled"`` (support label -1, entropy inner
        loss; folds and support drawn without looking at any gold tool; ``shots`` unused) or
        ``"docs"`` (pseudo-items from the tools' docs; no folds; ``shots`` unused).

    Attributes:
      support_sizes: ``(set name, fold, items, tools)`` of every adaptation, for reporting.
    """

    def __init__(self, bank: SharedBottomEncoder, settings, meta_params, shots: int,
                 max_support: int = DEFAULT_MAX_SUPPORT, support: str = "labelled"):
        if support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
        if shots < 1:
            raise ValueError(f"mta_adapt needs shots >= 1, got {shots}")
        if max_support < 1:
            raise ValueError(f"mta_adapt needs max_support >= 1, got {max_support}")
        self.bank, self.s, self.meta_params = bank, settings, meta_params
        self.shots, self.max_support, self.support = shots, max_support, support
        self.support_sizes: list[tuple[str, int, int, int]] = []
        # The support episode holds every candidate doc of up to ``max_support`` items (ToolLens:
        # ~1,000 docs), not a training episode's 8: without per-layer remat, the activations kept
        # for the inner gradient of LoRA on four layers over 128-token docs peaked at 14-18 GB RSS.
        # Remat keeps the layer inputs only: same values, 5.7 GB, no slower (BUILD_NOTES.md).
        cfg = bank.cfg if bank.cfg.remat else dataclasses.replace(bank.cfg, remat=True)
        loss = losses.BiEncoderLoss(cfg, start=bank.first_layer, scale=settings.loss_scale)
        self._adapt = jax.jit(functools.partial(meta.adapt_for_eval, algo=settings.meta, loss_fn=loss,
                                                has_aux=True))

        self._render = functools.partial(render.tool_text, style=settings.data.doc_style)

    @property
    def labelled(self) -> bool:
        """Whether support items carry their gold label (k-shot and doc pseudo-items do)."""
        return self.support != "unlabelled"

    def _doc(self, eval_set: EvalSet, tool_id: str) -> str:
        return self._render(eval_set.catalogue[tool_id])

    def _bottoms(self, texts: list[str], max_len: int, rows: int):
        ids, mask = self.bank.tok.encode(texts, max_len)
        pad = rows - len(texts)
        ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
        return self.bank._bottom(self.bank.base, ids, mask), mask

    def _support(self, eval_set: EvalSet, items) -> dict:
        """One episode from support items: the union of their candidates is the episode's docs.

        Doc rows are padded with fully masked rows that are never a candidate, so sets of similar
        size share compiled shapes; every support item is one query row (no repeats, which would
        reweight the support loss).
        """
        c = max(len(it.candidates) for it in items)
        rows = len(items)
        docs: dict[str, int] = {}
        cands = np.zeros((rows, c), np.int32)
        labels = np.zeros((rows,), np.int32)
        for i, it in enumerate(items):
            for j, t in enumerate(it.candidates):
                cands[i, j] = docs.setdefault(t, len(docs))
            labels[i] = it.candidates.index(it.gold[0]) if self.labelled else -1
        texts = [self._doc(eval_set, t) for t in docs]
        tool_h, tool_mask = self._bottoms(texts, self.s.data.doc_len, _round_up(len(texts)))
        queries = [it.query for it in items]
        query_h, query_mask = self._bottoms(queries, self.s.data.query_len, rows)
        return {"tool_h": tool_h, "tool_mask": tool_mask, "query_h": query_h, "query_mask": query_mask,
                "cands": cands, "label": labels}

    def _support_items(self, items, by_tool_fold: dict[str, np.ndarray]):
        """Round-robin over tools (sorted ids): each tool's first, then second, ... fold item."""
        chosen = []
        for rank in range(self.shots):
            for tool in sorted(by_tool_fold):
                idx = by_tool_fold[tool]
                if rank < len(idx) and len(chosen) < self.max_support:
                    chosen.append(items[int(idx[rank])])
        return chosen

    @staticmethod
    def _folds(first: EvalSet) -> tuple[dict, dict]:
        """Per gold tool, a seeded half of its items in each fold (``{tool: item indices}``)."""
        by_tool: dict[str, list[int]] = {}
        for i, it in enumerate(first.items):
            by_tool.setdefault(it.gold[0], []).append(i)
        folds: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        for tool, idx in sorted(by_tool.items()):
            rng = np.random.default_rng((first.seed or 0, zlib.crc32(tool.encode("utf-8"))))
            perm = rng.permutation(idx)
            folds[0][tool], folds[1][tool] = perm[: len(perm) // 2], perm[len(perm) // 2:]
        return folds

    @staticmethod
    def _unlabelled_folds(first: EvalSet) -> tuple[dict, dict]:
        """Two halves of a seeded permutation of all items, each under the single key ``None``."""
        perm = np.random.default_rng((first.seed or 0, len(first.items))).permutation(len(first.items))
        half = len(perm) // 2
        return {None: perm[:half]}, {None: perm[half:]}

    def _doc_items(self, first: EvalSet) -> list[EvalItem]:
        """One pseudo-item per tool among the set's candidates (sorted ids, capped at ``max_support``)."""
        tools = sorted({t for it in first.items for t in it.candidates})
        c = max(len(it.candidates) for it in first.items)
        rng = np.random.default_rng((first.seed or 0, len(tools)))
        out = []
        for tool in tools[: self.max_support]:
            others = [t for t in tools if t != tool]
            cands = [str(t) for t in rng.choice(others, min(c - 1, len(others)), replace=False)]
            cands.insert(int(rng.integers(len(cands) + 1)), tool)
            out.append(EvalItem(f"doc:{tool}", render.pseudo_query(first.catalogue[tool]), (tool,), tuple(cands)))
        return out

    def _score_with_docs(self, group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
        support = self._doc_items(group[0])
        if len(support) < 2:
            raise ValueError(f"{group[0].name}: adapting from docs needs at least 2 candidate tools")
        self.support_sizes.append((group[0].name, 0, len(support), len(support)))
        return self._adapt_and_score(group[0], support, list(group))

    def _adapt_and_score(self, first: EvalSet, support: list[EvalItem], sets: list[EvalSet]):
        """Adapts one LoRA on ``support`` (items of ``first``) and scores ``sets`` with it."""
        lora = self._adapt(self.meta_params, self.bank.base, self._support(first, support))
        try:
            return methods_lib.embedding_scorer(self.bank.embed_fn(lora), self._render)(sets)
        finally:
            self.bank.drop_embeddings(lora)  # used once: do not keep its cache alive

    def __call__(self, group: Sequence[EvalSet]) -> list[list[np.ndarray]]:
        first = group[0]
        for s in group[1:]:
            if [it.id for it in s.items] != [it.id for it in first.items]:
                raise ValueError(f"{s.name}: seed {s.seed} lists other items than seed {first.seed}")
        if any(it.candidates is None for it in first.items):
            raise ValueError(f"mta_adapt needs shipped candidates; {first.name} ranks the whole pool")
        if self.support == "docs":
            return self._score_with_docs(group)
        folds = self._folds(first) if self.labelled else self._unlabelled_folds(first)
        out = [[None] * len(s.items) for s in group]
        for k in (0, 1):
            scored = sorted(int(i) for idx in folds[k].values() for i in idx)
            if self.labelled:
                support = self._support_items(first.items, {t: i for t, i in folds[1 - k].items() if len(i)})
            else:  # the other half, in its seeded order (no gold tool consulted)
                support = [first.items[int(i)] for i in folds[1 - k][None][: self.max_support]]
            if not scored:
                continue
            if not support:
                raise ValueError(f"{first.name}: fold {1 - k} has no items to adapt on")
            self.support_sizes.append((first.name, k, len(support), len({it.gold[0] for it in support})))
            fold = [dataclasses.replace(s, items=tuple(s.items[i] for i in scored)) for s in group]
            fold_scores = self._adapt_and_score(first, support, fold)
            for si, per_item in enumerate(fold_scores):
                for i, x in zip(scored, per_item):
                    out[si][i] = x
        return out


def adapt_scorer(bank: SharedBottomEncoder, settings, meta_params, shots: int,
                 max_support: int = DEFAULT_MAX_SUPPORT, support: str = "labelled") -> AdaptScorer:
    """Factory used by the evaluation wiring (``train/evaluate.py``)."""
    return AdaptScorer(bank, settings, meta_params, shots, max_support, support)
