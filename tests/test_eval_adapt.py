"""``mta_adapt``: per-tool folds never put a scored item in its own support set; singletons fall back."""
import jax
import numpy as np
import pytest
from conftest import load_config

from mta_jax import meta
from mta_jax.data.records import Catalogue, Tool
from mta_jax.eval import adapt as adapt_lib
from mta_jax.eval.encoders import SharedBottomEncoder
from mta_jax.eval.sets import EvalItem, EvalSet
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


def test_support_never_contains_the_scored_item(setup, monkeypatch):
    s, meta_params, bank = setup
    scorer = adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)
    supports = []
    original = scorer._support

    def recording(eval_set, items):
        supports.append({it.id for it in items})
        return original(eval_set, items)

    monkeypatch.setattr(scorer, "_support", recording)
    group = toy_group()
    scores = scorer(group)
    assert len(supports) == 4                     # 2 folds x (t0, t1); the singleton t2 has none
    assert scorer.fallbacks == 1
    for per_set in scores:
        assert len(per_set) == 10 and all(np.isfinite(x).all() and x.shape == (3,) for x in per_set)
    # Every support set is drawn from one tool's items and the two folds of a tool are disjoint.
    assert supports[0].isdisjoint(supports[1]) and supports[2].isdisjoint(supports[3])


def test_adaptation_changes_scores_and_whole_pool_is_rejected(setup):
    s, meta_params, bank = setup
    group = toy_group()
    adapted = adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)(group)
    init = meta.initial_params(meta_params, s.meta)
    from mta_jax.eval.methods import embedding_scorer
    from mta_jax.data.render import tool_text
    import functools
    plain = embedding_scorer(bank.embed_fn(init), render=functools.partial(tool_text, style=s.data.doc_style))(group)
    diff = max(np.abs(a - b).max() for a, b in zip(adapted[0][:9], plain[0][:9]))
    assert diff > 1e-6                            # the inner loop moved the LoRA
    np.testing.assert_allclose(adapted[0][9], plain[0][9], atol=1e-6)   # singleton: un-adapted
    pool = (EvalSet("p", "toy", group[0].catalogue, (EvalItem("x", "q", ("t0",), None),)),)
    with pytest.raises(ValueError, match="shipped candidates"):
        adapt_lib.adapt_scorer(bank, s, meta_params, shots=2)(pool)
