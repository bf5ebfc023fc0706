"""``mta_adapt``: a scored item is never in its support set, and its gold label cannot choose its model."""
import functools

import jax
import numpy as np
import pytest
from conftest import load_config

from mta_jax import meta
from mta_jax.data.records import Catalogue, Tool
from mta_jax.eval import adapt as adapt_lib
from mta_jax.eval.encoders import SharedBottomEncoder
from mta_jax.eval.sets import EvalItem, EvalSet
from mta_jax.meta import losses
from mta_jax.model import lora as lora_lib
from mta_jax.train import loop
from mta_jax.train import state as state_lib
from mta_jax.train import workloads


@pytest.fixture(scope="module")
def setup():
    s = state_lib.settings_from_config(load_config("tiny"))
    name, cfg, base, tok = workloads.load_backbone(s.model_path, "float32", False)
    adapter = lora_lib.init_lora(jax.random.key(0), base, s.lora)
    adapter = jax.tree.map(lambda x: x + 0.05, adapter)
    state = meta.init_state(adapter, s.meta, loop.make_outer_optimizer(s))
    bank = SharedBottomEncoder(cfg, base, tok, first_layer=s.lora.first_layer, max_len=32, batch_size=8)
    return s, state.params, bank


def toy_group():
    tools = [Tool(f"t{i}", f"tool{i}", d) for i, d in enumerate(
        ["weather forecast", "stock prices", "translate text", "book flights", "play music"])]
    cat = Catalogue(tools)
    items = []
    for k in range(5):                      # tool t0: 5 items, t1: 4 items, t2: 1 item (singleton)
        items.append(EvalItem(f"a{k}", f"rain tomorrow {k}?", ("t0",), ("t1", "t0", "t3")))
    for k in range(4):
        items.append(EvalItem(f"b{k}", f"ACME share {k}", ("t1",), ("t1", "t2", "t4")))
    items.append(EvalItem("c0", "say bonjour", ("t2",), ("t3", "t4", "t2")))
    return tuple(EvalSet("toy/test", "toy", cat, tuple(items), seed=s) for s in (0, 1))


def _record_adaptations(scorer, monkeypatch) -> list[tuple[set, set]]:
    """Records, per adapted LoRA, (ids of its support items, ids of the items it scores)."""
    calls = []
    original = scorer._adapt_and_score

    def recording(first, support, sets):
        calls.append(({it.id for it in support}, {it.id for it in sets[0].items}))
        return original(first, support, sets)

    monkeypatch.setattr(scorer, "_adapt_and_score", recording)
    return calls


def test_support_never_contains_the_scored_item(setup, monkeypatch):
    s, meta_params, bank = setup
    scorer = adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)
    adaptations = _record_adaptations(scorer, monkeypatch)
    supports = []
    original = scorer._support

    def recording(eval_set, items):
        supports.append([it.id for it in items])
        return original(eval_set, items)

    monkeypatch.setattr(scorer, "_support", recording)
    group = toy_group()
    scores = scorer(group)
    assert len(supports) == 2                     # one adaptation per fold, for all tools at once
    for per_set in scores:
        assert len(per_set) == 10 and all(np.isfinite(x).all() and x.shape == (3,) for x in per_set)
    # Each fold's support holds up to `shots` items of every tool with items in the other fold.
    assert set(supports[0]).isdisjoint(supports[1])
    for sup in supports:
        tools = [i[0] for i in sup]
        assert all(tools.count(t) <= 2 for t in set(tools)) and {"a", "b"} <= set(tools)
    assert [(k, n) for _, k, n, _ in scorer.support_sizes] == [(0, len(supports[0])), (1, len(supports[1]))]
    # The LoRA that scores an item was adapted on other items only, and every item is scored once.
    assert len(adaptations) == 2
    for support_ids, scored_ids in adaptations:
        assert support_ids and scored_ids and support_ids.isdisjoint(scored_ids)
    assert sorted(i for _, scored in adaptations for i in scored) == sorted(it.id for it in group[0].items)


def test_gold_labels_of_scored_items_cannot_choose_their_model(setup):
    """Two query texts, each asked 6 times with the same candidates, gold split over two tools: a
    scorer that does not look at the answer gives the t0 items and the t1 items of one query the
    same score vector. The earlier per-gold-tool adaptation gave each tool's items their own vector
    (checked by hand: it fails this test)."""
    s, meta_params, bank = setup
    tools = [Tool(f"t{i}", f"tool{i}", d) for i, d in enumerate(["weather forecast", "stock prices", "maps"])]
    queries = ("what should I use?", "which one fits?")
    items = tuple(EvalItem(f"x{k}", queries[k // 6], (("t0", "t1")[k % 2],), ("t0", "t1", "t2"))
                  for k in range(12))
    group = (EvalSet("leak/test", "leak", Catalogue(tools), items, seed=0),)
    scores = adapt_lib.adapt_scorer(bank, s, meta_params, shots=3)(group)[0]
    for q in queries:
        by_gold = {g: {tuple(np.round(x, 6)) for x, it in zip(scores, items) if it.gold[0] == g and it.query == q}
                   for g in ("t0", "t1")}
        assert by_gold["t0"] == by_gold["t1"] and len(by_gold["t0"]) == 1, by_gold


def test_items_with_the_same_query_share_a_fold_so_none_adapts_on_its_own_copy(setup, monkeypatch):
    s, meta_params, bank = setup
    tools = [Tool(f"t{i}", f"tool{i}", d) for i, d in enumerate(["weather forecast", "stock prices", "maps"])]
    # API-Bank style twins (same query, same gold) and ToolLens style (same query, another gold)
    queries = ["rain today?", "rain today?", "ACME price", "ACME price ", "weather and stocks", "weather and stocks",
               "umbrella needed?", "share value", "forecast please", "quote for ACME"]
    golds = ["t0", "t0", "t1", "t1", "t0", "t1", "t0", "t1", "t0", "t1"]
    items = tuple(EvalItem(f"x{k}", q, (g,), ("t0", "t1", "t2")) for k, (q, g) in enumerate(zip(queries, golds)))
    group = (EvalSet("dup/test", "dup", Catalogue(tools), items, seed=0),)
    scorer = adapt_lib.adapt_scorer(bank, s, meta_params, shots=5)
    supports = []
    original = scorer._adapt_and_score
    monkeypatch.setattr(scorer, "_adapt_and_score", lambda first, support, sets: (
        supports.append(({it.query.strip() for it in support}, {it.query.strip() for it in sets[0].items})),
        original(first, support, sets))[1])
    scorer(group)
    assert len(supports) == 2
    for support_queries, scored_queries in supports:
        assert support_queries and support_queries.isdisjoint(scored_queries)
    # without duplicates the split is the plain seeded half of every tool's items
    groups = np.arange(7)
    assert [f.tolist() for f in adapt_lib._split(np.array([6, 2, 4, 0, 5, 1, 3]), groups, {})] == [[6, 2, 4], [0, 5, 1, 3]]


def test_multi_gold_and_short_candidate_lists_are_masked_in_the_support_loss(setup):
    s, meta_params, bank = setup
    tools = [Tool(f"t{i}", f"tool{i}", d) for i, d in enumerate(["weather forecast", "stock prices", "maps"])]
    items = (EvalItem("m", "weather and stocks", ("t1", "t0"), ("t0", "t1", "t2")),  # both gold
             EvalItem("one", "rain?", ("t0",), ("t0",)),                               # a single candidate
             EvalItem("far", "maps", ("t2",), ("t1", "t2")))
    es = EvalSet("mask/test", "mask", Catalogue(tools), items, seed=0)
    batch = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1)._support(es, list(items))
    np.testing.assert_array_equal(batch["label"], [0, 0, 1])   # the first gold tool in candidate order
    np.testing.assert_array_equal(batch["cand_mask"], [[True, False, True], [True, False, False], [True, True, False]])
    bad = EvalItem("nogold", "x", ("t2",), ("t0", "t1"))
    with pytest.raises(ValueError, match="nogold"):
        adapt_lib.adapt_scorer(bank, s, meta_params, shots=1)._support(es, [bad])
    # the masked loss is the mean over items of the cross-entropy over each one's unmasked candidates
    loss_fn = losses.BiEncoderLoss(bank.cfg, start=bank.first_layer, scale=s.loss_scale)
    init = meta.initial_params(meta_params, s.meta)
    full, _ = loss_fn(init, bank.base, batch)
    per_item = []
    for i in range(3):
        keep = np.flatnonzero(batch["cand_mask"][i])
        one = {k: v for k, v in batch.items() if k != "cand_mask"}
        one.update(query_h=batch["query_h"][i:i + 1], query_mask=batch["query_mask"][i:i + 1],
                   cands=batch["cands"][i:i + 1, keep], label=np.array([list(keep).index(batch["label"][i])]))
        per_item.append(float(loss_fn(init, bank.base, one)[0]))
    assert per_item[1] == pytest.approx(0.0, abs=1e-6) and per_item[0] > 0.01 and per_item[2] > 0.01
    np.testing.assert_allclose(float(full), np.mean(per_item), rtol=1e-5)


def test_support_loss_uses_the_temperature_trained_for_the_sets_dataset(setup):
    """With ``loss.dataset_scale``, a set's support episode carries its dataset's scale (others keep
    ``loss.scale``) and the inner loss is the loss at that scale; without it no scale is added."""
    import dataclasses as dc

    s, meta_params, bank = setup
    tools = [Tool(f"t{i}", f"tool{i}", d) for i, d in enumerate(["weather forecast", "stock prices", "maps"])]
    items = (EvalItem("a", "rain tomorrow?", ("t0",), ("t0", "t1", "t2")),
             EvalItem("b", "share price", ("t1",), ("t2", "t1", "t0")))
    per_dataset = dc.replace(s, loss_dataset_scale=(("metatool", 5.0),))
    init = meta.initial_params(meta_params, s.meta)
    batches = {}
    for name in ("metatool/test_sd", "bfcl/multiple"):
        es = EvalSet(name, name.split("/")[0], Catalogue(tools), items, seed=0)
        assert "scale" not in adapt_lib.adapt_scorer(bank, s, meta_params, shots=1)._support(es, list(items))
        batches[name] = adapt_lib.adapt_scorer(bank, per_dataset, meta_params, shots=1)._support(es, list(items))
    assert float(batches["metatool/test_sd"]["scale"]) == 5.0
    assert float(batches["bfcl/multiple"]["scale"]) == s.loss_scale != 5.0
    got, _ = losses.BiEncoderLoss(bank.cfg, start=bank.first_layer, scale=s.loss_scale)(
        init, bank.base, batches["metatool/test_sd"])
    plain = {k: v for k, v in batches["metatool/test_sd"].items() if k != "scale"}
    want, _ = losses.BiEncoderLoss(bank.cfg, start=bank.first_layer, scale=5.0)(init, bank.base, plain)
    other, _ = losses.BiEncoderLoss(bank.cfg, start=bank.first_layer, scale=s.loss_scale)(init, bank.base, plain)
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(got) != pytest.approx(float(other), rel=1e-3)


def _unadapted_scores(setup, group):
    """Scores of the initialisation itself (no inner loop)."""
    import functools

    from mta_jax.data.render import tool_text
    from mta_jax.eval.methods import embedding_scorer

    s, meta_params, bank = setup
    init = meta.initial_params(meta_params, s.meta)
    return embedding_scorer(bank.embed_fn(init), render=functools.partial(tool_text, style=s.data.doc_style))(group)


def test_adaptation_changes_scores_and_whole_pool_is_rejected(setup):
    s, meta_params, bank = setup
    group = toy_group()
    adapted = adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)(group)
    plain = _unadapted_scores(setup, group)
    diff = max(np.abs(a - b).max() for a, b in zip(adapted[0], plain[0]))
    assert diff > 1e-6                            # the inner loop moved the LoRA
    pool = (EvalSet("p", "toy", group[0].catalogue, (EvalItem("x", "q", ("t0",), None),)),)
    with pytest.raises(ValueError, match="shipped candidates"):
        adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)(pool)


def test_test_time_inner_loop_overrides(setup):
    import dataclasses

    import ml_collections

    from mta_jax.train.evaluate import test_time_meta

    s, meta_params, bank = setup
    ev = lambda **kw: ml_collections.ConfigDict({"adapt_steps": 0, "adapt_lr": 0.0, **kw})
    assert test_time_meta(s.meta, ev()) == s.meta                     # 0 = as trained
    assert test_time_meta(s.meta, ml_collections.ConfigDict()) == s.meta  # configs without the fields
    got = test_time_meta(s.meta, ev(adapt_steps=3, adapt_lr=0.2))
    assert (got.inner.steps, got.inner.lr) == (3, 0.2)
    assert dataclasses.replace(got, inner=s.meta.inner) == s.meta     # nothing else changes
    with pytest.raises(ValueError, match="adapt_steps"):
        test_time_meta(s.meta, ev(adapt_steps=-1))
    with pytest.raises(ValueError, match="meta_sgd"):
        test_time_meta(dataclasses.replace(s.meta, name="meta_sgd"), ev(adapt_lr=0.1))
    # Two test-time steps adapt further than one: the scores move on from the one-step scores.
    group = toy_group()
    one = adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)(group)
    s2 = dataclasses.replace(s, meta=test_time_meta(s.meta, ev(adapt_steps=2)))
    two = adapt_lib.adapt_scorer(bank, s2, meta_params, shots=2)(group)
    assert max(np.abs(a - b).max() for a, b in zip(one[0], two[0])) > 1e-6


def _relabelled(group, seed):
    """The same items with their gold tools redrawn among their candidates."""
    import dataclasses
    rng = np.random.default_rng(seed)
    golds = [it.candidates[int(rng.integers(len(it.candidates)))] for it in group[0].items]
    return tuple(dataclasses.replace(es, items=tuple(dataclasses.replace(it, gold=(g,))
                                                        for it, g in zip(es.items, golds)))
                 for es in group)


def test_unlabelled_adaptation_never_reads_a_gold_label(setup, monkeypatch):
    """``mta_tta``: redrawing every item's gold leaves every score unchanged (it does change the
    labelled scorer's, whose folds and support labels come from the golds); support labels are -1,
    the support comes from the other half and is capped at ``max_support``."""
    s, meta_params, bank = setup
    group = toy_group()
    scorer = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, max_support=4, support="unlabelled")
    adaptations = _record_adaptations(scorer, monkeypatch)
    supports = []
    original = scorer._support

    def recording(eval_set, items):
        batch = original(eval_set, items)
        supports.append(([it.id for it in items], batch["label"]))
        return batch

    monkeypatch.setattr(scorer, "_support", recording)
    scores = scorer(group)
    assert len(supports) == 2 and all((lab == -1).all() and len(ids) == 4 for ids, lab in supports)
    assert set(supports[0][0]).isdisjoint(supports[1][0])
    assert len(adaptations) == 2
    for support_ids, scored_ids in adaptations:
        assert support_ids and scored_ids and support_ids.isdisjoint(scored_ids)
    assert sorted(i for _, scored in adaptations for i in scored) == sorted(it.id for it in group[0].items)
    for relabel_seed in (1, 2):
        again = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, max_support=4, support="unlabelled")(
            _relabelled(group, relabel_seed))
        for a, b in zip(scores[0], again[0]):
            np.testing.assert_array_equal(a, b)
    labelled = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, max_support=4)
    before, after = labelled(group), labelled(_relabelled(group, 1))
    assert max(np.abs(a - b).max() for a, b in zip(before[0], after[0])) > 1e-6


def test_unlabelled_adaptation_moves_the_scores(setup):
    """The entropy inner step changes the LoRA: the scores differ from the unadapted initialisation's."""
    s, meta_params, bank = setup
    group = toy_group()
    adapted = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, support="unlabelled")(group)
    plain = _unadapted_scores(setup, group)
    assert max(np.abs(a - b).max() for a, b in zip(adapted[0], plain[0])) > 1e-6


def test_docs_adaptation_uses_only_the_tools_docs(setup, monkeypatch):
    """``mta_docs``: one pseudo-item per candidate tool (its description, labelled with itself);
    changing one item's query changes that item's scores only, and relabelling changes nothing."""
    import dataclasses

    s, meta_params, bank = setup
    group = toy_group()
    scorer = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, support="docs")
    supports = []
    original = scorer._support
    monkeypatch.setattr(scorer, "_support", lambda es, items: (supports.append(items), original(es, items))[1])
    scores = scorer(group)
    (items,) = supports
    cat = group[0].catalogue
    assert [it.gold[0] for it in items] == ["t0", "t1", "t2", "t3", "t4"]
    for it in items:
        assert it.query == cat[it.gold[0]].description and it.gold[0] in it.candidates
        assert len(set(it.candidates)) == 3  # C = the set's candidate count
    again = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, support="docs")(_relabelled(group, 3))
    for a, b in zip(scores[0], again[0]):
        np.testing.assert_array_equal(a, b)
    edited = tuple(dataclasses.replace(es, items=(dataclasses.replace(es.items[0], query="something else"),)
                                       + es.items[1:]) for es in group)
    moved = adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, support="docs")(edited)
    assert np.abs(moved[0][0] - scores[0][0]).max() > 1e-6
    for a, b in zip(scores[0][1:], moved[0][1:]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="support must be one of"):
        adapt_lib.adapt_scorer(bank, s, meta_params, shots=1, support="queries")


def test_adaptation_rematerialises_layers_and_gives_the_same_lora(setup):
    """The test-time inner loop runs with per-layer remat (its support episode holds every candidate
    doc of up to 256 items); the adapted LoRA must equal the one adapted without remat."""
    s, meta_params, bank = setup
    assert not bank.cfg.remat
    scorer = adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)
    group = toy_group()
    support = scorer._support(group[0], list(group[0].items[:6]))
    plain = jax.jit(functools.partial(
        meta.adapt_for_eval, algo=s.meta, has_aux=True,
        loss_fn=losses.BiEncoderLoss(bank.cfg, start=bank.first_layer, scale=s.loss_scale)))
    assert "remat" in str(jax.make_jaxpr(scorer._adapt)(meta_params, bank.base, support))
    assert "remat" not in str(jax.make_jaxpr(plain)(meta_params, bank.base, support))
    got, want = scorer._adapt(meta_params, bank.base, support), plain(meta_params, bank.base, support)
    init = meta.initial_params(meta_params, s.meta)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(init))) > 1e-4  # it adapted
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_per_example_tools_give_a_clear_error_not_a_silent_score(setup):
    """BFCL-style sets: every gold tool has one item, so no fold holds other items of its tools."""
    s, meta_params, bank = setup
    tools = [Tool(f"t{i}", f"tool{i}", f"does thing {i}") for i in range(4)]
    items = tuple(EvalItem(f"x{k}", f"request {k}", (f"t{k}",), ("t0", "t1", "t2", "t3")) for k in range(4))
    group = (EvalSet("perex/test", "perex", Catalogue(tools), items, seed=0),)
    with pytest.raises(ValueError, match=r"perex/test: fold 0 has no items to adapt on; 4 of its 4 gold tools "
                                         r"have a single item"):
        adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)(group)
