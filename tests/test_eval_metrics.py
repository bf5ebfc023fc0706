"""Metrics on hand-computed cases: ties, multi-gold, recall@k, nDCG with a known ideal, seed aggregation."""
import dataclasses
import itertools
import math

import numpy as np
import pytest

from mta_jax.data.records import Catalogue, Tool
from mta_jax.eval import metrics
from mta_jax.eval.sets import EvalItem, EvalSet

CANDS = ("a", "b", "c", "d", "e")


def _catalogue(ids):
    return Catalogue([Tool(t, t, f"tool {t}") for t in ids])


def test_choose_ties_go_to_first_candidate():
    assert metrics.choose(np.array([1.0, 3.0, 3.0, 2.0])) == 1
    assert metrics.choose(np.zeros(4)) == 0
    with pytest.raises(ValueError, match="NaN"):
        metrics.choose(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.choose(np.array([]))


def test_top1_multi_gold_any_gold_counts():
    s = np.array([0.1, 0.2, 0.9, 0.3, 0.0])
    assert metrics.top1_credit(s, CANDS, ("c",)) == 1.0
    assert metrics.top1_credit(s, CANDS, ("a", "c")) == 1.0
    assert metrics.top1_credit(s, CANDS, ("a", "b")) == 0.0
    assert metrics.top1_credit(s, CANDS, ("z",)) == 0.0  # a gold tool outside the candidates


def test_top1_ties_score_their_expectation_whatever_the_candidate_order():
    tie = np.array([0.5, 0.5, 0.0, 0.0, 0.0])
    assert metrics.top1_credit(tie, CANDS, ("a",)) == 0.5
    assert metrics.top1_credit(tie, CANDS, ("b",)) == 0.5
    assert metrics.top1_credit(tie, CANDS, ("a", "b")) == 1.0
    assert metrics.top1_credit(tie, CANDS, ("c",)) == 0.0
    # a constant scorer gets the chance rate, also when the gold tool is listed first
    assert metrics.top1_credit(np.zeros(5), CANDS, ("a",)) == pytest.approx(0.2)
    assert metrics.top1_credit(np.zeros(5), CANDS, ("a", "e")) == pytest.approx(0.4)


def _first_wins(scores, cands, gold, k):
    """The metrics with ties broken by candidate order (stable sort): one draw of a random tie order."""
    order = np.argsort(-scores, kind="stable")
    g = set(gold)
    top1 = float(cands[order[0]] in g)
    recall = sum(cands[i] in g for i in order[:k]) / len(g)
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(order[:k]) if cands[i] in g)
    return np.array([top1, recall, dcg / sum(1 / math.log2(r + 2) for r in range(min(len(g), k)))])


@pytest.mark.parametrize("seed", range(4))
def test_tied_metrics_equal_their_mean_over_every_order_of_the_candidates(seed):
    rng = np.random.default_rng(seed)
    cands = tuple("abcdef")
    scores = rng.integers(0, 3, len(cands)).astype(float)  # many ties
    gold = tuple(rng.choice(cands, int(rng.integers(1, 3)), replace=False))
    k = 3
    draws = []
    for perm in itertools.permutations(range(len(cands))):
        p = list(perm)
        draws.append(_first_wins(scores[p], tuple(cands[i] for i in p), gold, k))
    want = np.mean(draws, axis=0)
    got = [metrics.top1_credit(scores, cands, gold), metrics.recall_at_k(scores, cands, gold, k=k),
           metrics.ndcg_at_k(scores, cands, gold, k=k)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_tie_ranks():
    lo, hi = metrics.tie_ranks(np.array([1.0, 3.0, 3.0, 2.0, 1.0]))
    np.testing.assert_array_equal(lo, [3, 0, 0, 2, 3])
    np.testing.assert_array_equal(hi, [5, 2, 2, 3, 5])
    with pytest.raises(ValueError, match="NaN"):
        metrics.tie_ranks(np.array([0.1, np.nan]))


def test_recall_at_k_hand_computed():
    cands = tuple("abcdefg")
    s = np.array([7, 6, 5, 4, 3, 2, 1], float)  # ranking a..g
    assert metrics.recall_at_k(s, cands, ("a", "g"), k=5) == 0.5
    assert metrics.recall_at_k(s, cands, ("a", "e"), k=5) == 1.0
    assert metrics.recall_at_k(s, cands, ("f",), k=5) == 0.0
    # ties count by expectation: with all 7 scores equal each tool is in the top 5 with p = 5/7
    assert metrics.recall_at_k(np.zeros(7), cands, ("e", "f"), k=5) == pytest.approx(5 / 7)
    # a tie straddling the cut-off: b, c, d share ranks 1..3, the top 3 holds two of them
    s = np.array([9, 5, 5, 5, 1, 0, 0], float)
    assert metrics.recall_at_k(s, cands, ("c",), k=3) == pytest.approx(2 / 3)
    assert metrics.recall_at_k(s, cands, ("a", "d"), k=3) == pytest.approx((1 + 2 / 3) / 2)


def test_ndcg_known_ideal():
    s = np.array([5, 4, 3, 2, 1], float)  # ranking a, b, c, d, e
    got = metrics.ndcg_at_k(s, CANDS, ("b", "d"), k=10)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)  # relevant at ranks 2 and 4
    ideal = 1 / math.log2(2) + 1 / math.log2(3)  # two relevant tools at ranks 1 and 2
    assert got == pytest.approx(dcg / ideal, abs=1e-12)
    assert metrics.ndcg_at_k(s, CANDS, ("a", "b"), k=10) == pytest.approx(1.0)
    # cut-off: a relevant tool at rank 4 with k=3 contributes nothing; ideal uses min(|gold|, k)
    assert metrics.ndcg_at_k(s, CANDS, ("d",), k=3) == 0.0
    got = metrics.ndcg_at_k(s, CANDS, ("a", "b", "c", "d"), k=2)
    assert got == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gold"):
        metrics.ndcg_at_k(s, CANDS, (), k=3)


def test_mean_std_is_sample_std():
    mean, std = metrics.mean_std([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9)
    assert std == pytest.approx(math.sqrt((0.01 + 0 + 0.01) / 2))  # ddof=1
    assert metrics.mean_std([0.7]) == (0.7, None)


def _pool_set():
    cat = _catalogue("abcdefg")
    items = (EvalItem("q0", "x", ("a",), None), EvalItem("q1", "y", ("b", "g"), None))
    return EvalSet("toy/pool", "toy", cat, items, skipped_empty_gold=3)


def test_set_metrics_pool_set():
    s = _pool_set()
    scores = [np.array([7, 6, 5, 4, 3, 2, 1.0]), np.array([7, 6, 5, 4, 3, 2, 1.0])]
    m = metrics.set_metrics(s, scores)
    assert m["n"] == 2 and m["accuracy"] == 0.5
    assert m["recall@5"] == pytest.approx((1.0 + 0.5) / 2)
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(8)) / (1 + 1 / math.log2(3))  # b rank 2, g rank 7
    assert m["ndcg@10"] == pytest.approx((1.0 + ndcg_q1) / 2)
    entry = metrics.aggregate((s,), [m])
    assert entry["std"] is None and entry["skipped_empty_gold"] == 3 and "seeds" not in entry
    with pytest.raises(ValueError, match="q1"):
        metrics.set_metrics(s, [scores[0], np.zeros(3)])
    with pytest.raises(ValueError, match="score vectors"):
        metrics.set_metrics(s, scores[:1])


def test_evaluate_aggregates_seeds():
    cat = _catalogue("abcde")
    group = tuple(
        EvalSet("toy/seeded", "toy", cat,
                tuple(EvalItem(f"q{i}", "x", (g,), CANDS) for i, g in enumerate(golds)), seed=seed)
        for seed, golds in enumerate([("a", "a", "b", "c"), ("a", "b", "b", "b"), ("a", "a", "a", "a")]))

    def first(group_):  # always picks candidate "a"
        return [[np.array([1.0, 0, 0, 0, 0]) for _ in s.items] for s in group_]

    res = metrics.evaluate({"first": first}, {"toy/seeded": group})
    e = res["toy/seeded"]["first"]
    accs = [0.5, 0.25, 1.0]
    assert e["accuracy"] == pytest.approx(np.mean(accs))
    assert e["std"] == pytest.approx(np.std(accs, ddof=1))
    assert e["n"] == 4 and e["seeds"] == 3 and "recall@5" not in e
    bad = lambda g: [[np.zeros(5) for _ in s.items] for s in g[:1]]
    with pytest.raises(ValueError, match="returned 1 score lists"):
        metrics.evaluate({"bad": bad}, {"toy/seeded": group})
    assert "n_total" not in e  # only a subsampled group reports the files' size
    sub = tuple(dataclasses.replace(s, items=s.items[:3], total_items=4) for s in group)
    e = metrics.evaluate({"first": first}, {"toy/seeded": sub})["toy/seeded"]["first"]
    assert e["n"] == 3 and e["n_total"] == 4
    assert e["accuracy"] == pytest.approx(np.mean([2 / 3, 1 / 3, 1.0]))


def test_an_abstention_counts_wrong_even_when_every_candidate_is_gold():
    abstain = np.full(5, metrics.ABSTAIN)
    assert metrics.top1_credit(abstain, CANDS, CANDS) == 0.0
    assert metrics.recall_at_k(abstain, CANDS, ("a",), k=5) == 0.0
    assert metrics.ndcg_at_k(abstain, CANDS, ("a",), k=10) == 0.0
    one = EvalSet("toy/one", "toy", _catalogue("a"), (EvalItem("q0", "x", ("a",), ("a",)),))
    assert metrics.set_metrics(one, [np.full(1, metrics.ABSTAIN)])["accuracy"] == 0.0
    assert metrics.set_metrics(one, [np.zeros(1)])["accuracy"] == 1.0
    # one -inf among finite scores is an ordinary (very low) score, not an abstention
    assert metrics.top1_credit(np.array([metrics.ABSTAIN, 0, 0, 0, 0]), CANDS, ("a",)) == 0.0
    assert metrics.top1_credit(np.array([metrics.ABSTAIN, 0, 0, 0, 0]), CANDS, ("b",)) == 0.25
