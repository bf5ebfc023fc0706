"""Episode sampling: train tools only, determinism in (seed, step), valid candidates/labels, SD domains."""
import numpy as np
import pytest

from mta_jax.data import records
from mta_jax.tasks import episodes, protocol

KEYS = ("tools", "support_items", "support_cands", "support_label", "query_items", "query_cands", "query_label")


@pytest.fixture(scope="module")
def pool(data_dir):
    return episodes.load_train_pool(data_dir, ["metatool", "toollens"])


def _check_batch(pool, b, cfg):
    t = b["tools"].shape[0]
    assert b["tools"].shape == (t, cfg.tools_per_episode)
    for k in KEYS:
        assert b[k].dtype == np.int32, k
    for part, n in (("support", cfg.support), ("query", cfg.query)):
        items, cands, label = b[f"{part}_items"], b[f"{part}_cands"], b[f"{part}_label"]
        assert items.shape == (t, n) and cands.shape == (t, n, cfg.candidates) and label.shape == (t, n)
        for e in range(t):
            tools = b["tools"][e]
            for j in range(n):
                i, row = items[e, j], cands[e, j]
                assert len(set(row.tolist())) == cfg.candidates
                assert tools[row[label[e, j]]] == pool.item_gold[i]  # label points at the gold
                assert not set(tools[row].tolist()) & pool.item_excluded[i]
    for e in range(t):
        assert len(set(b["tools"][e].tolist())) == cfg.tools_per_episode
        assert len(set(b["support_items"][e].tolist()) | set(b["query_items"][e].tolist())) == cfg.support + cfg.query
        assert len(set(pool.tool_dataset[b["tools"][e]].tolist())) == 1  # one dataset per episode


def test_pool_indexes_all_tools_and_train_items(data_dir, pool):
    assert len(pool.tools) == 199 + 464 and len(pool.item_ids) == 15220 + 36400
    assert pool.tool_is_train.sum() == 141 + 343
    assert pool.tool_is_train[pool.item_gold].all()
    g = pool.tool_index("toollens", "5")
    assert pool.tools[g].tool_id == "5" and pool.tool_dataset[g] == 1
    for d in ("metatool", "toollens"):
        splits = protocol.load_splits(data_dir, d)
        off = pool.tool_offsets[pool.datasets.index(d)]
        assert all(pool.tool_is_train[off + i] == (splits[t.tool_id] == "train")
                   for i, t in enumerate(pool.tools[off:off + len(splits)]))


@pytest.mark.parametrize("regime", ["sd", "cd", "mixed"])
def test_batches_valid_and_only_train_tools(pool, regime):
    cfg = episodes.EpisodeConfig(8, 5, 5, 5, regime, "items")
    s = episodes.EpisodeSampler(pool, cfg, seed=3)
    seen = set()
    for step in range(150):
        b = s.batch(step, 4)
        seen |= set(b["tools"].ravel().tolist())
        if step < 10:
            _check_batch(pool, b, cfg)
        if regime != "mixed":
            assert (b["regime"] == protocol.REGIMES[regime]).all()
    assert pool.tool_is_train[list(seen)].all()
    assert len(seen) > 300  # broad coverage of the 484 train tools


def test_sd_episodes_share_domain_except_topups(pool):
    s = episodes.EpisodeSampler(pool, episodes.EpisodeConfig(12, 3, 3, 5, "sd"), seed=0)
    topups = 0
    for step in range(100):
        b = s.batch(step, 2)
        for e in range(2):
            doms = pool.tool_domain[b["tools"][e]]
            k = 12 - int(b["topup"][e])  # the episode's domain comes first, then the counted top-ups
            assert (doms[:k] == doms[0]).all() and not (doms[k:] == doms[0]).any()
            if k < 12:  # a top-up happens only when the whole domain is already in
                train_in_domain = pool.tool_is_train & (pool.tool_domain == doms[0])
                assert k == len(np.intersect1d(np.flatnonzero(train_in_domain), pool.item_gold))
            topups += int(b["topup"][e] > 0)
    assert topups > 0  # metatool cluster-6 (8 tools) and small ToolLens categories need top-ups at N=12


def test_deterministic_in_seed_and_step(pool):
    cfg = episodes.EpisodeConfig(10, 4, 6, 5, "mixed")
    a = episodes.EpisodeSampler(pool, cfg, seed=7)
    b = episodes.EpisodeSampler(pool, cfg, seed=7)
    x, y = a.batch(5, 4), b.batch(5, 4)
    assert all(np.array_equal(x[k], y[k]) for k in x)
    assert any(not np.array_equal(x[k], a.batch(6, 4)[k]) for k in KEYS)
    assert any(not np.array_equal(x[k], episodes.EpisodeSampler(pool, cfg, seed=8).batch(5, 4)[k]) for k in KEYS)
    # A host drawing tasks 2..3 gets exactly the global batch's tasks 2..3.
    part = a.batch(5, 2, first_task=2)
    assert all(np.array_equal(part[k], x[k][2:]) for k in x)


def test_pooled_batch(pool):
    cfg = episodes.EpisodeConfig(8, 5, 5, 4, "cd")
    s = episodes.EpisodeSampler(pool, cfg, seed=1)
    b = s.pooled_batch(0, 16)
    assert b["tools"].shape == (1, 64) and b["query_cands"].shape == (1, 16, 4) and b["support_items"].shape == (1, 0)
    tools = b["tools"][0]
    for j in range(16):
        row = tools[b["query_cands"][0, j]]
        assert row[b["query_label"][0, j]] == pool.item_gold[b["query_items"][0, j]]
        assert len(set(pool.tool_dataset[row].tolist())) == 1
    assert pool.tool_is_train[tools].all()
    assert np.array_equal(s.pooled_batch(0, 16)["tools"][0], tools)
    assert not np.array_equal(s.pooled_batch(1, 16)["tools"][0], tools)


def _tiny_pool(excluded=()):
    tools = [records.Tool(f"t{i}", f"t{i}", "d", None, "A") for i in range(6)]
    cat = records.Catalogue(tools)
    splits = {f"t{i}": "train" for i in range(5)} | {"t5": "test"}
    items = [protocol.ProtocolItem(f"q{k}::t{i}", f"q{k}", f"t{i}", None, tuple(excluded if i == 0 else ()))
             for i in range(5) for k in range(3)]
    return episodes.build_pool([("tiny", cat, splits, items)])


def test_tiny_pool_never_uses_test_tool_or_excluded():
    pool = _tiny_pool(excluded=("t1",))
    s = episodes.EpisodeSampler(pool, episodes.EpisodeConfig(5, 4, 4, 3, "cd"), seed=0)
    for step in range(50):
        b = s.batch(step, 2)
        assert 5 not in b["tools"]
        _check_batch(pool, b, s.config)


def test_small_episodes_redraw_tool_sets_instead_of_failing(pool):
    """6-way episodes with 5 candidates (one support and one query item per tool) used to stop
    training on ToolLens tools whose every item marks two of the episode's tools as also-correct."""
    cfg = episodes.EpisodeConfig(tools_per_episode=6, support=6, query=6, candidates=5, regime="mixed")
    s = episodes.EpisodeSampler(pool, cfg, seed=0)
    for step in range(40):
        b = s.batch(step, 4)
        _check_batch(pool, b, cfg)
        for e in range(4):  # S = Q = N: every tool of the episode has one support and one query item
            for part in ("support", "query"):
                golds = pool.item_gold[b[f"{part}_items"][e]]
                assert sorted(golds.tolist()) == sorted(b["tools"][e].tolist())
    again = episodes.EpisodeSampler(pool, cfg, seed=0).batch(7, 4)
    assert all(np.array_equal(again[k], s.batch(7, 4)[k]) for k in KEYS)  # redraws stay deterministic


def test_impossible_episodes_fail_with_advice():
    # Every episode holds all five train tools, and t0's items exclude t1: t0 never gets 4 distractors.
    s = episodes.EpisodeSampler(_tiny_pool(excluded=("t1",)), episodes.EpisodeConfig(5, 5, 5, 5, "cd"), seed=0)
    with pytest.raises(ValueError, match=r"tool 't0' excludes too many.*50 draws.*raise tools_per_episode \(5\)"):
        s.batch(0, 1)


def test_bad_configs_and_pools():
    with pytest.raises(ValueError, match="regime"):
        episodes.EpisodeConfig(regime="both")
    with pytest.raises(ValueError, match="candidates"):
        episodes.EpisodeConfig(tools_per_episode=4, candidates=5)
    with pytest.raises(ValueError, match="only 5 train tools"):
        episodes.EpisodeSampler(_tiny_pool(), episodes.EpisodeConfig(8, 2, 2, 3), seed=0)
    tools = [records.Tool("a", "a", "d"), records.Tool("b", "b", "d")]
    bad = [protocol.ProtocolItem("q::b", "q", "b", None, ())]
    with pytest.raises(ValueError, match="not a train tool"):
        episodes.build_pool([("x", records.Catalogue(tools), {"a": "train", "b": "test"}, bad)])


def test_hidden_support_labels_mask_only_the_support_labels(pool):
    """``support_labels="hidden"`` draws the same episodes and sets every support label to -1."""
    gold = episodes.EpisodeSampler(pool, episodes.EpisodeConfig(), seed=5)
    hidden = episodes.EpisodeSampler(pool, episodes.EpisodeConfig(support_labels="hidden"), seed=5)
    for step in range(3):
        a, b = gold.batch(step, 4), hidden.batch(step, 4)
        assert (b["support_label"] == -1).all() and (a["support_label"] >= 0).all()
        for k in a:
            if k != "support_label":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(ValueError, match="support_labels"):
        episodes.EpisodeConfig(support_labels="none")


def test_doc_support_items_are_the_episode_tools_labelled_with_themselves(pool):
    cfg = episodes.EpisodeConfig(support=8, query=10, support_source="docs")
    b = episodes.EpisodeSampler(pool, cfg, seed=2).batch(0, 4)
    for e in range(4):
        tools = b["tools"][e]
        own = b["support_items"][e]
        assert len(set(own.tolist())) == 8 and set(own.tolist()) == set(tools.tolist())
        for j in range(8):
            row = b["support_cands"][e, j]
            assert len(set(row.tolist())) == cfg.candidates and tools[row[b["support_label"][e, j]]] == own[j]
        for j, i in enumerate(b["query_items"][e]):  # query items stay labelled train queries
            assert tools[b["query_cands"][e, j][b["query_label"][e, j]]] == pool.item_gold[i]
    with pytest.raises(ValueError, match="support_source='docs' needs"):
        episodes.EpisodeConfig(support=9, support_source="docs")
    with pytest.raises(ValueError, match="support_source"):
        episodes.EpisodeConfig(support_source="examples")


@pytest.mark.parametrize("regime", ["sd", "cd"])
def test_disjoint_query_tools_split_the_episode_tools(pool, regime):
    """``query_tools="disjoint"``: support items (gold and distractors) use one half of the episode's
    tools, query items only the other half; the halves differ between episodes."""
    cfg = episodes.EpisodeConfig(10, 5, 5, 5, regime, query_tools="disjoint")
    s = episodes.EpisodeSampler(pool, cfg, seed=4)
    halves = set()
    for step in range(20):
        b = s.batch(step, 4)
        _check_batch(pool, b, cfg)
        for e in range(4):
            s_used = set(b["support_cands"][e].ravel().tolist())
            q_used = set(b["query_cands"][e].ravel().tolist())
            assert not s_used & q_used
            assert len(s_used) <= 5 and len(q_used) <= 5  # each within its half of the 10 tools
            golds_s = {int(pool.item_gold[i]) for i in b["support_items"][e]}
            golds_q = {int(pool.item_gold[i]) for i in b["query_items"][e]}
            assert not golds_s & golds_q
            halves.add(frozenset(s_used))
    assert len(halves) > 40  # a fresh random split per episode, not a fixed position
    np.testing.assert_array_equal(s.batch(3, 2)["query_cands"],
                                  episodes.EpisodeSampler(pool, cfg, seed=4).batch(3, 2)["query_cands"])


def test_shared_query_tools_let_support_and_query_overlap(pool):
    """The default ("shared") draws support and query items over all the episode's tools: their tools
    overlap in most episodes (the property ``"disjoint"`` removes)."""
    b = episodes.EpisodeSampler(pool, episodes.EpisodeConfig(10, 5, 5, 5, "cd"), seed=4).batch(0, 8)
    overlaps = [bool(set(b["support_cands"][e].ravel().tolist()) & set(b["query_cands"][e].ravel().tolist()))
                for e in range(8)]
    assert sum(overlaps) >= 6


def test_disjoint_query_tools_config_errors():
    with pytest.raises(ValueError, match="query_tools"):
        episodes.EpisodeConfig(query_tools="split")
    with pytest.raises(ValueError, match=r"candidates \(5\) <= tools_per_episode // 2"):
        episodes.EpisodeConfig(8, 5, 5, 5, query_tools="disjoint")
    with pytest.raises(ValueError, match=r"support \(7\) <= tools_per_episode // 2"):
        episodes.EpisodeConfig(12, 7, 5, 5, support_source="docs", query_tools="disjoint")


def test_disjoint_doc_support_uses_the_support_half(pool):
    cfg = episodes.EpisodeConfig(10, 5, 5, 5, "cd", support_source="docs", query_tools="disjoint")
    b = episodes.EpisodeSampler(pool, cfg, seed=1).batch(0, 4)
    for e in range(4):
        tools = b["tools"][e]
        s_used = set(b["support_cands"][e].ravel().tolist())
        assert set(b["support_items"][e].tolist()) == set(tools[sorted(s_used)].tolist())
        assert not s_used & set(b["query_cands"][e].ravel().tolist())
