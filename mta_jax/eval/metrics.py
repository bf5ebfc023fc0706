"""Tool-selection metrics (top-1 accuracy, recall@k, nDCG@k), seed aggregation and the `evaluate` loop.

Conventions:

* A method returns, per item, one score per candidate (in the item's candidate order) or, for
  ``candidates=None`` items, one score per catalogue tool (in catalogue order).
* Exact ties are scored by their expectation under a uniformly random order of the tied
  candidates: top-1 gives ``|gold ∩ best| / |best|`` for the set ``best`` of candidates sharing
  the maximum, and recall@k / nDCG@k give each tied gold tool the mean over the ranks its tie
  spans. So a constant scorer gets exactly the chance rate whatever the candidate order — the
  shipped candidate lists often put the gold tool first (Seal-Tools, API-Bank, BFCL), where a
  "first candidate wins ties" rule would reward tied or collapsed scores. Deterministic.
  (:func:`choose`, a single deterministic pick, takes the first of the tied.)
* A score vector of all :data:`ABSTAIN` (``-inf``) is an abstention — e.g. a generated answer that
  names no candidate — and counts as wrong for every metric, even where every candidate is gold.
* Seeds of a protocol set are aggregated as mean and **sample** standard deviation
  (``ddof=1``, :data:`STD_DDOF`): the five protocol seeds are draws of distractor sets, and the
  spread we report is the estimate of that draw-to-draw variability, not of five fixed numbers.
  A single-seed set has ``std = None``.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # only for annotations: metrics stay importable without the data layer
    from mta_jax.eval.sets import EvalItem, EvalSet

STD_DDOF = 1
ABSTAIN = -np.inf  # every score of an item at this value: the method made no choice (counted wrong)
RECALL_K = 5
NDCG_K = 10

# A method scores every set of a group (e.g. the 5 seeds of a protocol set) in one call, so
# embedding methods can embed each unique text once across seeds. A scorer may also have a
# ``prepare(groups)`` method, called once with every group before any scoring (embedding methods
# embed all texts of the run there, in full batches).
Scorer = Callable[[Sequence["EvalSet"]], list[list[np.ndarray]]]


def choose(scores: np.ndarray) -> int:
    """Index of the highest score; ties go to the first (lowest index) candidate."""
    scores = np.asarray(scores)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a NaN would make the choice arbitrary")
    return int(np.argmax(scores))


def tie_ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate, the ranks ``[lo, hi)`` (0 = best) that its exactly-tied group occupies.

    A candidate with a unique score has ``hi == lo + 1``; ``m`` candidates sharing a score all get
    the same ``m`` consecutive ranks, any of which a random order of the tie would give each.
    """
    s = np.asarray(scores)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a NaN would make the ranking arbitrary")
    _, group, counts = np.unique(-s, return_inverse=True, return_counts=True)  # best group first
    lo = (np.cumsum(counts) - counts)[group]
    return lo, lo + counts[group]


def _expected_gain(scores: np.ndarray, candidates: Sequence[str], gold: Sequence[str], k: int,
                   weight: Callable[[np.ndarray], np.ndarray]) -> tuple[float, int]:
    """``(sum over gold candidates of E[weight(rank)] for rank < k, |gold|)`` under a random order of ties.

    Each gold candidate's expectation is the mean of ``weight(r)`` over its tie ranks ``r`` (0 for
    ``r >= k``); an abstention (every score :data:`ABSTAIN`) gains nothing.
    """
    gold_set = set(gold)
    if np.all(np.asarray(scores) == ABSTAIN):
        return 0.0, len(gold_set)
    lo, hi = tie_ranks(scores)
    is_gold = np.fromiter((c in gold_set for c in candidates), bool, len(candidates))
    gain = 0.0
    for a, b in zip(lo[is_gold], hi[is_gold]):
        if a < k:
            gain += float(weight(np.arange(a, min(b, k))).sum()) / (b - a)
    return gain, len(gold_set)


def top1_credit(scores: np.ndarray, candidates: Sequence[str], gold: Sequence[str]) -> float:
    """Top-1 accuracy of one item: the fraction of the best-scored (tied) candidates that are gold.

    1 or 0 when the maximum is unique; multi-gold items count any gold tool as correct.
    """
    return _expected_gain(scores, candidates, gold, 1, np.ones_like)[0]


def recall_at_k(scores: np.ndarray, candidates: Sequence[str], gold: Sequence[str],
                k: int = RECALL_K) -> float:
    """Fraction of the gold tools found among the ``k`` highest-scored candidates (ties: expected)."""
    hits, n_gold = _expected_gain(scores, candidates, gold, k, np.ones_like)
    if not n_gold:
        raise ValueError("recall is undefined for an item without gold tools")
    return hits / n_gold


def ndcg_at_k(scores: np.ndarray, candidates: Sequence[str], gold: Sequence[str],
              k: int = NDCG_K) -> float:
    """Binary-relevance nDCG@k: ``sum_{rank r<=k, relevant} 1/log2(r+1)`` over the ideal value.

    The ideal ranking puts ``min(|gold|, k)`` relevant tools first (Järvelin & Kekäläinen, 2002);
    a tied tool gets the expected discount of a random order of its tie.
    """
    dcg, n_gold = _expected_gain(scores, candidates, gold, k, lambda r: 1.0 / np.log2(r + 2.0))
    if not n_gold:
        raise ValueError("nDCG is undefined for an item without gold tools")
    return dcg / sum(1.0 / math.log2(r + 2) for r in range(min(n_gold, k)))


def scored_items(eval_set: EvalSet, scores: Sequence[np.ndarray]) -> Iterator[tuple[EvalItem, tuple[str, ...], np.ndarray]]:
    """``(item, candidate ids, score array)`` per item: the item's candidates, or the whole catalogue
    (in catalogue order) for a ``candidates=None`` item.

    Raises:
      ValueError: the number of score vectors or of scores in one vector does not match, naming
        the set and item.
    """
    if len(scores) != len(eval_set.items):
        raise ValueError(f"{eval_set.label}: got {len(scores)} score vectors for "
                         f"{len(eval_set.items)} items")
    pool = None
    for item, s in zip(eval_set.items, scores):
        if item.candidates is None:
            pool = pool if pool is not None else tuple(eval_set.catalogue.ids())
            cands = pool
        else:
            cands = item.candidates
        s = np.asarray(s)
        if s.shape != (len(cands),):
            raise ValueError(f"{eval_set.label}: item {item.id!r} has {len(cands)} candidates "
                             f"but scores of shape {s.shape}")
        yield item, cands, s


def set_metrics(eval_set: EvalSet, scores: Sequence[np.ndarray]) -> dict[str, float]:
    """Metrics of one eval set given per-item scores.

    Returns ``{"accuracy", "n"}`` plus ``"recall@5"`` and ``"ndcg@10"`` when *all* the set's items
    are scored over the whole pool (``candidates=None``); a set mixing pool items and candidate
    lists reports accuracy only, since ranking metrics over a subset would not describe the set.

    Raises:
      ValueError: the number of score vectors or of scores in one vector does not match, naming
        the set and item.
    """
    correct, recalls, ndcgs = 0, [], []
    for item, cands, s in scored_items(eval_set, scores):
        correct += top1_credit(s, cands, item.gold)
        if item.candidates is None:
            recalls.append(recall_at_k(s, cands, item.gold))
            ndcgs.append(ndcg_at_k(s, cands, item.gold))
    n = len(eval_set.items)
    out: dict[str, float] = {"accuracy": correct / n if n else float("nan"), "n": n}
    if recalls and len(recalls) == n:  # a mixed set gets accuracy only: no subset averages
        out[f"recall@{RECALL_K}"] = float(np.mean(recalls))
        out[f"ndcg@{NDCG_K}"] = float(np.mean(ndcgs))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=STD_DDOF``); std is None for one value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("cannot aggregate zero values")
    if v.size <= STD_DDOF:
        return float(v.mean()), None
    return float(v.mean()), float(v.std(ddof=STD_DDOF))


def aggregate(group: Sequence[EvalSet], per_set: Sequence[Mapping[str, float]]) -> dict:
    """Combines the metrics of the sets of one group (protocol seeds) into one results entry.

    ``accuracy`` is the mean over sets and ``std`` its spread (see :func:`mean_std`); ranking
    metrics are averaged; ``n`` is the number of items per set (must agree across seeds), and
    ``n_total`` the number the sets held before :func:`mta_jax.eval.sets.subsample` (only then).
    """
    ns = {m["n"] for m in per_set}
    if len(ns) != 1:
        raise ValueError(f"{group[0].name}: sets of one group differ in size: {sorted(ns)}")
    acc, std = mean_std([m["accuracy"] for m in per_set])
    out: dict = {"accuracy": acc, "std": std, "n": ns.pop()}
    if len(group) > 1:
        out["seeds"] = len(group)
    if group[0].seed is not None:
        out["protocol_seeds"] = [s.seed for s in group]
    for key in (f"recall@{RECALL_K}", f"ndcg@{NDCG_K}"):
        if key in per_set[0]:
            out[key] = mean_std([m[key] for m in per_set])[0]
    skipped = {s.skipped_empty_gold for s in group}
    if any(skipped):
        out["skipped_empty_gold"] = max(skipped)
    if any(s.total_items is not None for s in group):  # subsampled (``eval.max_items``): the files' size
        out["n_total"] = max(s.total_items or len(s.items) for s in group)
    return out


def evaluate(methods: Mapping[str, Scorer], sets: Mapping[str, Sequence[EvalSet]],
             log: Callable[[str], None] | None = None,
             on_scores: Callable[[str, EvalSet, list[np.ndarray]], None] | None = None) -> dict:
    """Runs every method on every eval-set group and returns the ``results.json`` dict.

    Args:
      methods: method name -> scorer (see :data:`Scorer`).
      sets: eval-set name -> its sets (one per protocol seed, or a single set).
      log: optional callback receiving one progress line per (set, method).
      on_scores: optional ``(method, eval_set, per-item scores)`` callback, once per method and set
        (e.g. :class:`mta_jax.eval.predictions.Writer` records).

    Returns:
      ``{set name: {method name: entry}}`` with entries as in :func:`aggregate` plus ``seconds``
      (scoring time; a scorer's ``prepare`` time is logged, not counted there).
    """
    for set_name, group in sets.items():
        if not tuple(group):
            raise ValueError(f"eval set {set_name!r} has no sets")
    for method_name, scorer in methods.items():
        if hasattr(scorer, "prepare"):
            t0 = time.perf_counter()
            scorer.prepare([tuple(g) for g in sets.values()])
            if log is not None:
                log(f"{method_name}: prepared all sets in {time.perf_counter() - t0:.1f}s")
    results: dict = {}
    for set_name, group in sets.items():
        group = tuple(group)
        results[set_name] = {}
        for method_name, scorer in methods.items():
            t0 = time.perf_counter()
            all_scores = scorer(group)
            if len(all_scores) != len(group):
                raise ValueError(f"method {method_name!r} returned {len(all_scores)} score lists "
                                 f"for the {len(group)} sets of {set_name!r}")
            entry = aggregate(group, [set_metrics(s, sc) for s, sc in zip(group, all_scores)])
            if on_scores is not None:
                for s, sc in zip(group, all_scores):
                    on_scores(method_name, s, sc)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            results[set_name][method_name] = entry
            if log is not None:
                std = "" if entry["std"] is None else f" ± {100 * entry['std']:.1f}"
                log(f"{set_name:28s} {method_name:12s} acc {100 * entry['accuracy']:.1f}{std} "
                    f"(n={entry['n']}, {entry['seconds']:.1f}s)")
    return results
