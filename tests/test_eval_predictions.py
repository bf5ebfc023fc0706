"""Per-item predictions: records agree with the metrics, the file round-trips and rejects bad lines,
the paired comparison counts queries (not seed copies) and its sign test is the exact binomial."""
import gzip
import json
import math

import numpy as np
import pytest

from mta_jax.data.records import Catalogue, Tool
from mta_jax.eval import metrics, predictions
from mta_jax.eval.sets import EvalItem, EvalSet

CANDS = ("a", "b", "c", "d", "e")


def _group(seeds=3, n=40, seed=0):
    """A protocol-like group: the same queries per seed, other candidate orders, a pool item too."""
    rng = np.random.default_rng(seed)
    cat = Catalogue([Tool(t, t, f"tool {t}") for t in CANDS + ("f", "g")])
    group = []
    for s in range(seeds):
        items = [EvalItem(f"q{i}", "x", (CANDS[i % 5],) if i % 7 else ("a", "b"),
                          tuple(rng.permutation(CANDS)) if i % 11 else None) for i in range(n)]
        group.append(EvalSet("toy/seeded", "toy", cat, tuple(items), seed=s))
    return tuple(group)


def _scores(group, rng):
    out = []
    for s in group:
        per = []
        for i, item in enumerate(s.items):
            k = 7 if item.candidates is None else 5
            v = rng.integers(0, 3, size=k).astype(float)  # small integers: many exact ties
            per.append(np.full(k, metrics.ABSTAIN) if i == 3 else v)
        out.append(per)
    return out


def test_item_records_credit_is_the_metric_and_top_is_sorted():
    group = _group()
    scores = _scores(group, np.random.default_rng(1))
    for s, sc in zip(group, scores):
        recs = list(predictions.item_records(s, "m", sc))
        assert np.mean([r["credit"] for r in recs]) == pytest.approx(metrics.set_metrics(s, sc)["accuracy"])
        for item, r, v in zip(s.items, recs, sc):
            assert (r["set"], r["seed"], r["id"], r["gold"]) == ("toy/seeded", s.seed, item.id, list(item.gold))
            cands = item.candidates or tuple(s.catalogue.ids())
            if np.all(v == metrics.ABSTAIN):
                assert r["top"] == [] and r["credit"] == 0.0
                continue
            top = r["top"]
            assert len(top) == 5 and [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)
            assert top[0][0] == cands[metrics.choose(v)]  # ties: the first candidate, as choose picks
            assert all(v[cands.index(t)] == sc_ for t, sc_ in top)
    with pytest.raises(ValueError, match="q0"):
        list(predictions.item_records(group[0], "m", [np.zeros(3)] + scores[0][1:]))


def test_writer_round_trips_and_leaves_nothing_on_error(tmp_path):
    group = _group(seeds=2, n=12)
    scores = _scores(group, np.random.default_rng(2))
    path = tmp_path / "out" / "predictions.jsonl.gz"
    with predictions.Writer(path) as w:
        for s, sc in zip(group, scores):
            w.write(predictions.item_records(s, "m", sc))
    assert w.count == 24
    recs = predictions.read(path)
    assert recs == [r for s, sc in zip(group, scores) for r in predictions.item_records(s, "m", sc)]
    failed = tmp_path / "failed.jsonl.gz"
    with pytest.raises(RuntimeError, match="boom"):
        with predictions.Writer(failed) as w:
            w.write(predictions.item_records(group[0], "m", scores[0]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # neither the file nor its .tmp


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"set": "s", "seed": 0, "id": "q", "method": "m", "gold": ["a"], "top": []}),
     r"line 2: .*missing \['credit'\]"),
    (json.dumps({"set": "s", "seed": 0, "id": "q", "method": "m", "gold": ["a"], "credit": 1.5, "top": []}),
     r"line 2: credit 1.5"),
    (json.dumps({"set": "s", "seed": 0, "id": "q0", "method": "m", "gold": ["a"], "credit": 1, "top": []}),
     "line 2: a second record for set 's', seed 0, item 'q0'"),
])
def test_read_names_the_bad_line(tmp_path, line, message):
    first = {"set": "s", "seed": 0, "id": "q0", "method": "m", "gold": ["a"], "credit": 0, "top": []}
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(first) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        predictions.read(path)
    assert str(path) in str(e.value)


def test_sign_test_is_the_exact_two_sided_binomial():
    for n in range(0, 13):
        for w in range(n + 1):
            # enumerate every outcome: P(|W - n/2| >= |w - n/2|) under W ~ Binomial(n, 1/2)
            extreme = sum(math.comb(n, k) for k in range(n + 1) if abs(k - n / 2) >= abs(w - n / 2) - 1e-12)
            assert predictions.sign_test_p(w, n - w) == pytest.approx(min(1.0, extreme / 2 ** n)), (w, n)
    assert predictions.sign_test_p(0, 10) == pytest.approx(2 / 1024)
    from scipy import stats  # a jax dependency; its exact binomial test, at real test-set sizes
    for w, l in ((600, 400), (4400, 4434), (3, 2000), (1100, 1000)):
        assert predictions.sign_test_p(w, l) == pytest.approx(stats.binomtest(w, w + l, 0.5).pvalue, rel=1e-9, abs=1e-300)


def _rec(set_, seed, qid, method, credit):
    return {"set": set_, "seed": seed, "id": qid, "method": method, "gold": ["a"], "credit": credit, "top": []}


def test_paired_counts_queries_averaged_over_seeds():
    # q0: a wins on 2 of 3 seeds, loses on 1 -> a better on the query; q1: one win, one loss, a tie
    # -> level; q2: b wins on one seed -> b better. Per (seed, item) it would be 3 wins, 2 losses.
    table = {("q0", 0): (1, 0), ("q0", 1): (1, 0), ("q0", 2): (0, 1),
             ("q1", 0): (1, 0), ("q1", 1): (0, 1), ("q1", 2): (1, 1),
             ("q2", 0): (1, 1), ("q2", 1): (0, 1), ("q2", 2): (0, 0)}
    recs = [_rec("s", seed, q, m, c) for (q, seed), cs in table.items() for m, c in zip("ab", cs)]
    recs += [_rec("only_a", 0, "q0", "a", 1.0)]  # a set without b: not compared
    (p,) = predictions.paired(recs, "a", "b")
    assert (p.set, p.queries, p.seeds, p.wins, p.losses) == ("s", 3, 3, 1, 1)
    per_seed = [np.mean([table[(q, s)][j] for q in ("q0", "q1", "q2")]) for s in range(3) for j in (0, 1)]
    assert p.acc_a == pytest.approx(np.mean(per_seed[0::2])) and p.acc_b == pytest.approx(np.mean(per_seed[1::2]))
    assert p.p == 1.0
    with pytest.raises(ValueError, match="^s: 'a' and 'b' scored different items"):
        predictions.paired(recs[:-2], "a", "b")
    with pytest.raises(ValueError, match="no records of 'x' or 'y'"):
        predictions.paired(recs, "x", "y")


def test_evaluate_streams_predictions_that_reproduce_its_accuracy(tmp_path):
    group = _group(seeds=3, n=30, seed=3)
    rng = np.random.default_rng(4)
    fixed = {name: _scores(group, rng) for name in ("m1", "m2")}
    scorers = {name: (lambda g, sc=sc: sc) for name, sc in fixed.items()}
    path = tmp_path / "p.jsonl.gz"
    with predictions.Writer(path) as w:
        res = metrics.evaluate(scorers, {"toy/seeded": group},
                               on_scores=lambda m, s, sc: w.write(predictions.item_records(s, m, sc)))
    recs = predictions.read(path)
    assert len(recs) == 2 * 3 * 30
    (p,) = predictions.paired(recs, "m1", "m2")
    assert p.acc_a == pytest.approx(res["toy/seeded"]["m1"]["accuracy"])
    assert p.acc_b == pytest.approx(res["toy/seeded"]["m2"]["accuracy"])
    conf = predictions.confusions(recs, "m1", "toy/seeded")
    wrong = [r for r in recs if r["method"] == "m1" and r["credit"] == 0 and r["top"]]
    assert sum(conf.values()) == len(wrong) > 0
    assert all(chosen not in gold.split("|") for gold, chosen in conf)


def test_errors_by_gold_counts_items_once_and_errors_per_method():
    recs = [_rec("s", 0, "q0", "a", 0.0), _rec("s", 0, "q0", "b", 1.0), _rec("s", 1, "q0", "a", 0.5),
            _rec("s", 1, "q0", "b", 0.0), _rec("s", 0, "q1", "a", 1.0), _rec("s", 0, "q1", "b", 1.0),
            _rec("t", 0, "q9", "a", 0.0)]  # another set: not counted
    recs[4]["gold"] = recs[5]["gold"] = ["a", "c"]
    got = predictions.errors_by_gold(recs, ("a", "b"), "s")
    assert got == {"a": {"items": 2, "a": 1.5, "b": 1.0}, "a|c": {"items": 1, "a": 0.0, "b": 0.0}}


def _write(path, recs):
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_compare_pools_files_per_query(tmp_path):
    from launch import compare

    # Two runs (files) of the same queries: on q0 a wins in run 1 and loses in run 2 -> level when
    # pooled; on q1 a wins in both -> a better. Either file alone: 2 / 0 and 1 / 1.
    run1 = [_rec("s", 0, "q0", "a", 1), _rec("s", 0, "q0", "b", 0), _rec("s", 0, "q1", "a", 1), _rec("s", 0, "q1", "b", 0)]
    run2 = [_rec("s", 0, "q0", "a", 0), _rec("s", 0, "q0", "b", 1), _rec("s", 0, "q1", "a", 1), _rec("s", 0, "q1", "b", 0)]
    f1, f2 = _write(tmp_path / "1.jsonl.gz", run1), _write(tmp_path / "2.jsonl.gz", run2)

    def row(text):
        return [c.strip() for c in text.splitlines()[-1].strip("|").split("|")]

    assert row(compare.report(f1, "a", "b"))[1:] == ["2", "1", "100.0", "0.0", "+100.00", "2 / 0", "0.5"]
    assert row(compare.report([f1, f2], "a", "b"))[1:] == ["2", "2", "75.0", "25.0", "+50.00", "1 / 0", "1"]
    with pytest.raises(ValueError, match=r"no eval set holds both 'a' and 'c'; the files hold methods \['a', 'b'\]"):
        compare.report([f1, f2], "a", "c")
