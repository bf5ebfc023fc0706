"""Methods: random ≈ 1/|candidates|, BM25 and embedding scorers on synthetic sets, bucketing invariance."""
import jax
import jax.numpy as jnp
import numpy as np

from mta_jax.data.records import Catalogue, Tool
from mta_jax.eval import methods, metrics
from mta_jax.eval.sets import EvalItem, EvalSet


def _catalogue(n):
    return Catalogue([Tool(f"t{i}", f"tool{i}", f"word{i} shared") for i in range(n)])


def test_random_baseline_near_chance():
    cat = _catalogue(10)
    rng = np.random.default_rng(123)
    items, expected = [], 0.0
    for i in range(6000):
        k = int(rng.integers(2, 6))
        cands = tuple(f"t{j}" for j in rng.choice(10, k, replace=False))
        items.append(EvalItem(str(i), "q", (cands[int(rng.integers(k))],), cands))
        expected += 1 / k
    s = EvalSet("toy/rand", "toy", cat, tuple(items))
    expected /= len(items)
    res = metrics.evaluate({"random": methods.random_scorer(0)}, {"toy/rand": (s,)})
    acc = res["toy/rand"]["random"]["accuracy"]
    sigma = np.sqrt(expected * (1 - expected) / len(items))
    assert abs(acc - expected) < 4 * sigma
    # seeded: the same seed repeats, another seed differs
    a, b, c = (methods.random_scorer(sd)((s,))[0][:20] for sd in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_bm25_scorer_picks_matching_doc():
    cat = _catalogue(6)
    items = tuple(EvalItem(f"q{i}", f"please word{i}", (f"t{i}",), ("t0", "t1", "t2", "t3", "t4", "t5")
                           if i % 2 else None) for i in range(6))
    s = EvalSet("toy/bm25", "toy", cat, items)
    (scores,) = methods.bm25_scorer()((s,))
    m = metrics.set_metrics(s, scores)
    assert m["accuracy"] == 1.0 and "recall@5" not in m  # mixed set: accuracy only
    pool = EvalSet("toy/bm25", "toy", cat, tuple(EvalItem(i.id, i.query, i.gold, None) for i in items))
    (scores,) = methods.bm25_scorer()((pool,))
    assert [len(x) for x in scores] == [6] * 6
    assert metrics.set_metrics(pool, scores) == {"accuracy": 1.0, "n": 6, "recall@5": 1.0, "ndcg@10": 1.0}


def test_embedding_scorer_dedupes_and_uses_cosine():
    cat = _catalogue(4)
    calls = []
    vecs = {}

    def embed_fn(texts):
        calls.append(list(texts))
        r = np.random.default_rng(0)
        for t in texts:  # a fixed random (non-unit) vector per text
            vecs.setdefault(t, r.normal(size=8) * (1 + len(vecs)))
        return np.stack([vecs[t] for t in texts])

    group = tuple(EvalSet("toy/emb", "toy", cat, (
        EvalItem("a", "query one", ("t0",), ("t0", "t1")),
        EvalItem("b", "query two", ("t2",), ("t1", "t2", "t3")),
        EvalItem("c", "query one", ("t1",), None)), seed=sd) for sd in (0, 1))
    out = methods.embedding_scorer(embed_fn)(group)
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == 2 + 4  # 2 queries + 4 docs
    unit = lambda v: v / np.linalg.norm(v)
    doc = lambda t: unit(vecs[f"{cat[t].name}: {cat[t].description}"])
    q = unit(vecs["query two"])
    np.testing.assert_allclose(out[1][1], [q @ doc("t1"), q @ doc("t2"), q @ doc("t3")], rtol=1e-12)
    assert out[0][2].shape == (4,)


def test_embedding_scorer_prepare_embeds_all_sets_once():
    cat = _catalogue(5)
    calls = []

    def embed_fn(texts):
        calls.append(list(texts))
        return np.stack([np.random.default_rng(sum(map(ord, t))).normal(size=6) for t in texts])

    g1 = (EvalSet("toy/a", "toy", cat, (EvalItem("a", "q one", ("t0",), ("t0", "t1")),)),)
    g2 = (EvalSet("toy/b", "toy", cat, (EvalItem("b", "q one", ("t2",), ("t1", "t2", "t3")),
                                         EvalItem("c", "q two", ("t4",), None))),)
    ref = methods.embedding_scorer(embed_fn)
    want = [ref(g1), ref(g2)]
    assert len(calls) == 2  # one call per group without prepare
    calls.clear()
    scorer = methods.embedding_scorer(embed_fn)
    scorer.prepare([g1, g2])
    assert len(calls) == 1 and sorted(calls[0]) == sorted(set(calls[0]))  # each text once
    assert set(calls[0]) == set(methods.unique_texts([g1, g2])) and len(calls[0]) == 2 + 5
    got = [scorer(g1), scorer(g2)]
    assert len(calls) == 1  # scoring hits the cache
    for w, g in zip(want, got):
        for ws, gs in zip(w[0], g[0]):
            np.testing.assert_allclose(gs, ws, rtol=1e-12)


def test_evaluate_calls_prepare_once_before_scoring():
    cat = _catalogue(3)
    events = []

    class Scorer:
        def prepare(self, groups):
            events.append(("prepare", len(groups)))

        def __call__(self, group):
            events.append(("score", group[0].label))
            return [[np.arange(3.0) for _ in s.items] for s in group]

    sets = {n: (EvalSet(n, "toy", cat, (EvalItem("a", "q", ("t2",), ("t0", "t1", "t2")),)),)
            for n in ("toy/x", "toy/y")}
    res = metrics.evaluate({"m": Scorer()}, sets)
    assert events == [("prepare", 2), ("score", "toy/x"), ("score", "toy/y")]
    assert res["toy/x"]["m"]["accuracy"] == 1.0


def test_length_batches_cover_every_row_once_within_caps():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 257, 500)
    widths = list(methods.DEFAULT_BUCKETS)
    seen = []
    for sel, width, n_rows in methods.length_batches(lengths, widths, batch_size=128, batch_tokens=4096):
        assert 1 <= len(sel) <= n_rows == min(128, 4096 // width)
        assert (lengths[sel] <= width).all()
        lower = max([w for w in widths if w < width], default=0)
        assert (lengths[sel] > lower).all()  # the smallest bucket that holds the text
        seen.extend(sel.tolist())
    assert sorted(seen) == list(range(500))


class _ToyTokenizer:
    """Word-level: [CLS]=1 words... [SEP]=2, ids from a fixed hash; truncated to max_len incl. specials."""

    def encode(self, texts, max_len):
        ids = np.zeros((len(texts), max_len), np.int32)
        mask = np.zeros_like(ids)
        for r, t in enumerate(texts):
            toks = [1] + [3 + sum(map(ord, w)) % 90 for w in t.split()][: max_len - 2] + [2]
            ids[r, :len(toks)], mask[r, :len(toks)] = toks, 1
        return ids, mask


def test_embed_fn_bucketing_invariance():
    from mta_jax.model import encoder

    cfg = encoder.EncoderConfig(vocab_size=96, hidden_size=16, num_layers=2, num_heads=2,
                                intermediate_size=32, max_position=40)
    params = encoder.init_params(cfg, jax.random.key(0))
    tok = _ToyTokenizer()
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{int(x)}" for x in rng.integers(0, 50, n)) for n in (1, 3, 5, 9, 14, 31, 6, 2)]
    max_len = 24
    got_a = methods.make_encoder_embed_fn(cfg, params, tok, max_len=max_len, batch_size=3,
                                          buckets=(8,))(texts)
    got_b = methods.make_encoder_embed_fn(cfg, params, tok, max_len=max_len, batch_size=16, buckets=())(texts)
    got_c = methods.make_encoder_embed_fn(cfg, params, tok, max_len=max_len, batch_size=16, buckets=(8, 16),
                                          batch_tokens=20)(texts)  # 2 rows at width 8, 1 at 16 and 24
    ids, mask = tok.encode(texts, max_len)
    # reference: one batch, every text padded to max_len (no bucketing, no sorting)
    ref = np.asarray(encoder.encode(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got_a, ref, atol=1e-5)
    np.testing.assert_allclose(got_b, ref, atol=1e-5)
    np.testing.assert_allclose(got_c, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got_a, axis=1), 1.0, atol=1e-5)
    assert mask.sum(1).max() == max_len  # the long texts were truncated, so that path ran too


def test_progress_log_is_throttled_and_extrapolates_work_not_rows(monkeypatch):
    from mta_jax.eval import decoder_methods

    clock = iter([0.0, 10.0, 70.0, 80.0, 200.0, 0.0, 5.0])
    monkeypatch.setattr(decoder_methods.time, "perf_counter", lambda: next(clock))
    lines = []
    p = decoder_methods.ProgressLog("x", 4, 10.0, lines.append, every=60.0)  # starts at t=0
    p.advance(1, 1.0)  # t=10: not due
    p.advance(1, 1.0)  # t=70: due; 2 of 10 units of work in 70 s -> 280 s left (rows alone: 70 s)
    p.advance(1, 4.0)  # t=80: not due
    p.advance(1, 4.0)  # t=200: due, and the end
    assert lines == ["x: 2/4 rows, 70s, ~280s left", "x: 4/4 rows, 200s, ~0s left"]
    quiet = decoder_methods.ProgressLog("y", 1, 1.0, lines.append, every=60.0)  # t=0
    quiet.advance(1, 1.0)  # t=5: finished before any line was due: silent
    assert len(lines) == 2
