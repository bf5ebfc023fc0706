"""``mta_adapt``: k-shot inner-loop adaptation to the unseen tools before predicting (MTA + adapt).

The items of a set are split into two folds: each gold tool's items are divided by a seeded
permutation, keeping items with the same query text in one fold. The meta-learned LoRA is adapted
once per fold with the inner loop of training on a support set drawn from the *other* fold — up to
``shots`` items of every unseen tool, round-robin over the tools up to ``max_support`` items, each
with its own shipped candidates (a multi-gold item's other gold tools left out of its softmax) —
and that one adapted LoRA scores every item of the fold. So neither a scored item nor a copy of
its query is ever in its support set, and the
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

import collections
import dataclasses
import functools
import zlib
from typing import Sequence

import jax
import numpy as np

from mta_jax import meta
from mta_jax.data import render
from mta_jax.eval import decoder_methods
from mta_jax.eval import methods as methods_lib
from mta_jax.eval.encoders import SharedBottomEncoder
from mta_jax.eval.sets import EvalItem, EvalSet
from mta_jax.meta import losses
from mta_jax.tasks import prompts as prompts_lib

SUPPORTS = ("labelled", "unlabelled", "docs")
DEFAULT_MAX_SUPPORT = 256  # support items per adaptation (MetaTool's 37 test tools x 5 shots fit)
# Support doc rows are padded to a multiple of this (fewer distinct shapes to compile across sets).
_PAD = 32


def _round_up(n: int, m: int = _PAD) -> int:
    return max(m, -(-n // m) * m)


def _query_groups(items: Sequence[EvalItem]) -> np.ndarray:
    """A group id per item; items with the same (stripped) query text share one."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(it.query.strip(), len(ids)) for it in items], np.int64)


def _split(order: np.ndarray, groups: np.ndarray, fold_of_group: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``order`` (item indices) into two folds of ``len // 2`` and the rest, as groups allow.

    Every item goes to its group's fold. A group seen for the first time (here or in an earlier
    call sharing ``fold_of_group``) goes to fold 0 if all its items in ``order`` still fit in the
    first half, else to fold 1. With every group a single item this is exactly
    ``order[:n // 2], order[n // 2:]``; each fold keeps ``order``'s order.
    """
    half, out = len(order) // 2, ([], [])
    members = collections.Counter(int(groups[i]) for i in order)
    size = [0, 0]
    for g, m in members.items():
        if g in fold_of_group:
            size[fold_of_group[g]] += m
    for i in order:
        g = int(groups[i])
        if g not in fold_of_group:
            fold_of_group[g] = 0 if size[0] + members[g] <= half else 1
            size[fold_of_group[g]] += members[g]
        out[fold_of_group[g]].append(int(i))
    return np.array(out[0], np.int64), np.array(out[1], np.int64)


def _support_label(eval_set: EvalSet, item: EvalItem) -> int:
    """Position of the item's first gold tool among its candidates (the support item's label)."""
    for j, t in enumerate(item.candidates):
        if t in item.gold:
            return j
    raise ValueError(f"{eval_set.name}: item {item.id!r} has none of its gold tools {list(item.gold)} "
                     f"among its candidates, so it cannot be a labelled support item")


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
        self._init_common(settings, meta_params, shots, max_support, support)
        self.bank = bank
        # The support episode holds every candidate doc of up to ``max_support`` items (ToolLens:
        # ~1,000 docs), not a training episode's 8: without per-layer remat, the activations kept
        # for the inner gradient of LoRA on four layers over 128-token docs peaked at 14-18 GB RSS.
        # Remat keeps the layer inputs only: same values, 5.7 GB, no slower (BUILD_NOTES.md).
        cfg = bank.cfg if bank.cfg.remat else dataclasses.replace(bank.cfg, remat=True)
        loss = losses.BiEncoderLoss(cfg, start=bank.first_layer, scale=settings.loss_scale)
        self._adapt = jax.jit(functools.partial(meta.adapt_for_eval, algo=settings.meta, loss_fn=loss,
                                                has_aux=True))

        self._render = functools.partial(render.tool_text, style=settings.data.doc_style)

    def _init_common(self, settings, meta_params, shots: int, max_support: int, support: str,
                     supports: Sequence[str] = SUPPORTS) -> None:
        if support not in supports:
            raise ValueError(f"support must be one of {tuple(supports)}, got {support!r}")
        if shots < 1:
            raise ValueError(f"mta_adapt needs shots >= 1, got {shots}")
        if max_support < 1:
            raise ValueError(f"mta_adapt needs max_support >= 1, got {max_support}")
        self.s, self.meta_params = settings, meta_params
        self.shots, self.max_support, self.support = shots, max_support, support
        self.support_sizes: list[tuple[str, int, int, int]] = []

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
        cand_mask = np.zeros((rows, c), bool)
        labels = np.full((rows,), -1, np.int32)
        for i, it in enumerate(items):
            for j, t in enumerate(it.candidates):
                cands[i, j] = docs.setdefault(t, len(docs))
            cand_mask[i, : len(it.candidates)] = True
            if self.labelled:
                labels[i] = _support_label(eval_set, it)
                # another gold tool of a multi-gold item is not a wrong answer: leave it out of the
                # softmax, as the protocol files' ``excluded`` tools are left out of the candidates
                cand_mask[i, : len(it.candidates)] = [t not in it.gold or j == labels[i]
                                                      for j, t in enumerate(it.candidates)]
        texts = [self._doc(eval_set, t) for t in docs]
        tool_h, tool_mask = self._bottoms(texts, self.s.data.doc_len, _round_up(len(texts)))
        queries = [it.query for it in items]
        query_h, query_mask = self._bottoms(queries, self.s.data.query_len, rows)
        batch = {"tool_h": tool_h, "tool_mask": tool_mask, "query_h": query_h, "query_mask": query_mask,
                 "cands": cands, "cand_mask": cand_mask, "label": labels}
        if self.s.loss_dataset_scale:  # the temperature this dataset's episodes were trained with
            dataset = eval_set.name.split("/")[0]     # "metatool/test_sd" -> "metatool"
            batch["scale"] = np.float32(self.s.dataset_loss_scale(dataset))
        return batch

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
        """Per gold tool, a seeded half of its items in each fold (``{tool: item indices}``).

        Items with the same query text always share a fold (:func:`_split`), so no item is scored
        by a LoRA adapted on a copy of itself (API-Bank has identical items in two dialogue files;
        ToolLens lists one query once per gold tool).
        """
        groups = _query_groups(first.items)
        by_tool: dict[str, list[int]] = {}
        for i, it in enumerate(first.items):
            by_tool.setdefault(it.gold[0], []).append(i)
        folds: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        fold_of_group: dict[int, int] = {}
        for tool, idx in sorted(by_tool.items()):
            rng = np.random.default_rng((first.seed or 0, zlib.crc32(tool.encode("utf-8"))))
            folds[0][tool], folds[1][tool] = _split(rng.permutation(idx), groups, fold_of_group)
        return folds

    @staticmethod
    def _unlabelled_folds(first: EvalSet) -> tuple[dict, dict]:
        """Two halves of a seeded permutation of all items (same query text, same half), under key ``None``."""
        perm = np.random.default_rng((first.seed or 0, len(first.items))).permutation(len(first.items))
        half0, half1 = _split(perm, _query_groups(first.items), {})
        return {None: half0}, {None: half1}

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
                per_tool = collections.Counter(it.gold[0] for it in first.items)
                single = sum(1 for n in per_tool.values() if n == 1)
                raise ValueError(f"{first.name}: fold {1 - k} has no items to adapt on; {single} of its "
                                 f"{len(per_tool)} gold tools have a single item, and k-shot adaptation needs "
                                 f"other items of the same tools (sets with per-example tools, like "
                                 f"BFCL's, cannot be evaluated with {self.support!r} adaptation)")
            self.support_sizes.append((first.name, k, len(support), len({it.gold[0] for it in support})))
            fold = [dataclasses.replace(s, items=tuple(s.items[i] for i in scored)) for s in group]
            fold_scores = self._adapt_and_score(first, support, fold)
            for si, per_item in enumerate(fold_scores):
                for i, x in zip(scored, per_item):
                    out[si][i] = x
        return out


class DecoderAdaptScorer(AdaptScorer):
    """:class:`AdaptScorer` for a decoder: the same folds and support items; the inner loop runs
    the training loss (cross-entropy on the gold tool's name after a prompt listing the item's
    candidates, in the order constrained scoring shows them), and the adapted LoRA scores with
    :func:`mta_jax.eval.decoder_methods.decoder_scorer` (``variant``: ``""``, ``"@norm"``, ``"@gen"``).

    Supports ``"labelled"`` and ``"docs"``; the entropy loss of ``"unlabelled"`` items is
    encoder-only. A support episode is one batch of ``max_support`` rows at most, each as long as
    its longest prompt + name needs (up to ``max_len``; the prompt cut from the front beyond it),
    and its gradient is taken with every layer rematerialised; memory still grows with
    ``max_support x max_len`` tokens, so lower ``eval.adapt_max_support`` for a large model.
    """

    def __init__(self, backbone, settings, meta_params, shots: int, max_support: int = DEFAULT_MAX_SUPPORT,
                 support: str = "labelled", *, variant: str = "", max_len: int, batch_size: int,
                 log=None):
        self._init_common(settings, meta_params, shots, max_support, support, supports=("labelled", "docs"))
        self.bb, self.variant, self.max_len, self.batch_size, self.log = backbone, variant, max_len, batch_size, log
        self._adapt_fns: dict[int, object] = {}  # per target length (a static size of the loss)

    def _adapt_fn(self, max_target: int):
        if max_target not in self._adapt_fns:
            cfg = self.bb.cfg if self.bb.cfg.remat else dataclasses.replace(self.bb.cfg, remat=True)
            loss = losses.DecoderTargetLoss(cfg, max_target=max_target)
            self._adapt_fns[max_target] = jax.jit(functools.partial(
                meta.adapt_for_eval, algo=self.s.meta, loss_fn=loss, has_aux=True))
        return self._adapt_fns[max_target]

    def _support(self, eval_set: EvalSet, items) -> dict:
        """Prompt + gold name rows (right padded; rows padded to a multiple of 8 with empty targets)."""
        texts = decoder_methods.item_texts([dataclasses.replace(eval_set, items=tuple(items))])[0]
        prompts = [p for p, _ in texts]
        targets = [labels[_support_label(eval_set, it)] for it, (_, labels) in zip(items, texts)]
        tok, eos = self.bb.tok, self.bb.eos_id
        max_target = decoder_methods.target_budget(tok, targets, eos)
        longest = max(map(len, tok.tokenize(prompts, add_special_tokens=True))) + max_target
        enc = prompts_lib.PromptEncoder(tok, decoder_methods.padded_width(longest, self.max_len), max_target, eos)
        e = enc.pairs(prompts, targets)
        pad = _round_up(len(items), 8) - len(items)
        batch = {k: np.pad(getattr(e, k), ((0, pad), (0, 0))) for k in ("ids", "mask", "target_mask")}
        batch["max_target"] = max_target
        return batch

    def _adapt_and_score(self, first: EvalSet, support: list[EvalItem], sets: list[EvalSet]):
        batch = dict(self._support(first, support))
        adapt = self._adapt_fn(batch.pop("max_target"))
        lora = adapt(self.meta_params, self.bb.base, batch)
        scorer = decoder_methods.decoder_scorer(self.variant, self.bb.cfg, self.bb.base, self.bb.tok, lora,
                                                eos_id=self.bb.eos_id, max_len=self.max_len,
                                                batch_size=self.batch_size, log=self.log)
        return scorer(sets)


def adapt_scorer(bank: SharedBottomEncoder, settings, meta_params, shots: int,
                 max_support: int = DEFAULT_MAX_SUPPORT, support: str = "labelled") -> AdaptScorer:
    """Factory used by the evaluation wiring (``train/evaluate.py``)."""
    return AdaptScorer(bank, settings, meta_params, shots, max_support, support)
