"""The jitted meta-step: metrics, aux, no retracing, test-time adaptation, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mta_jax import meta
from mta_jax.model.lora import LoRAConfig, LoRAParams, init_lora, lora_dense

D, H, C = 16, 32, 4


def _model(key, d=D, h=H, c=C, layers=2):
    """A stacked-layer tanh MLP base and its LoRA tree (the shared conventions of model/lora.py)."""
    k1, k2, k3 = jax.random.split(key, 3)
    base = {"layers": {"w": {"kernel": jax.random.normal(k1, (layers, d, d)) / np.sqrt(d)}},
            "head": {"kernel": jax.random.normal(k2, (d, c)) / np.sqrt(d)}}
    lora = init_lora(k3, base, LoRAConfig(rank=4, targets="layers/w/kernel|head/kernel"))
    # Non-zero b so every factor has a gradient from the first step.
    lora = LoRAParams(jax.tree.map(lambda x: x + 0.1, lora.tree), lora.scale)
    return base, lora


def base_loss(lora, base, batch, counter=None):
    if counter is not None:
        counter.append(1)  # runs only while tracing
    h = batch["x"]

    def layer(h, xs):
        p, lo = xs
        return jnp.tanh(lora_dense(h, p, lo, lora.scale)), None

    h, _ = jax.lax.scan(layer, h, (base["layers"]["w"], lora.tree["layers"]["w"]))
    logits = lora_dense(h, base["head"], lora.tree["head"], lora.scale)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    return nll, {"acc": acc}


def _tasks(key, t, n, d=D):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (t, n, d)), "y": jax.random.randint(ky, (t, n), 0, C)}


@pytest.mark.parametrize("name", sorted(meta.ALGORITHMS))
def test_meta_step_metrics_and_no_retracing(name):
    base, lora = _model(jax.random.PRNGKey(0))
    inner = meta.InnerConfig(steps=2, lr=0.1, adapt_pattern="head/.*" if name == "anil" else None)
    algo = meta.MetaConfig(name=name, inner=inner)
    opt = optax.adam(1e-2)
    traces = []
    step = meta.make_meta_step(lambda p, b, x: base_loss(p, b, x, traces), algo, opt, has_aux=True)
    state = meta.init_state(lora, algo, opt)
    losses = []
    for i in range(3):
        k = jax.random.PRNGKey(i + 1)
        state, metrics = step(state, base, _tasks(k, 4, 8), _tasks(jax.random.fold_in(k, 1), 4, 8))
        if i == 0:
            first = len(traces)
        losses.append(metrics["outer/loss"])
    assert first > 0 and len(traces) == first, (first, len(traces))
    assert int(state.step) == 3
    want = {"outer/loss", "outer/grad_norm", "inner/loss_pre", "inner/loss_post", "outer/query_loss", "outer/acc"}
    assert want <= set(metrics), sorted(metrics)
    for k, v in metrics.items():
        assert v.shape == () and np.isfinite(float(v)), (k, v)
    if name not in ("pooled",):
        # Adapting on the support set lowers the support loss.
        assert float(metrics["inner/loss_post"]) < float(metrics["inner/loss_pre"])
    # The lora argument was copied into the state, so donation did not delete it.
    assert np.isfinite(np.asarray(lora.tree["head"]["a"])).all()


def test_task_loss_aux_and_adapt_return_aux():
    base, lora = _model(jax.random.PRNGKey(0))
    s, q = jax.tree.map(lambda x: x[0], _tasks(jax.random.PRNGKey(1), 1, 8)), \
        jax.tree.map(lambda x: x[0], _tasks(jax.random.PRNGKey(2), 1, 8))
    fn = lambda p, b: base_loss(p, base, b)
    cfg = meta.InnerConfig(steps=3, lr=0.5)
    loss, metrics = meta.task_loss(lora, fn, s, q, cfg, has_aux=True)
    adapted, aux = meta.adapt(lora, fn, s, cfg, has_aux=True, return_aux=True)
    assert aux.losses.shape == (3,) and aux.aux["acc"].shape == (3,)
    np.testing.assert_allclose(aux.losses[0], fn(lora, s)[0], rtol=1e-6)
    np.testing.assert_allclose(metrics["inner/loss_post"], fn(adapted, s)[0], rtol=1e-6)
    np.testing.assert_allclose(loss, fn(adapted, q)[0], rtol=1e-6)
    np.testing.assert_allclose(metrics["outer/acc"], fn(adapted, q)[1]["acc"])
    np.testing.assert_allclose(metrics["outer/query_loss"], loss, rtol=1e-6)
    _, lean = meta.task_loss(lora, fn, s, q, cfg, has_aux=True, post_loss=False)
    assert set(lean) == set(metrics) - {"inner/loss_post"}
    # With the support term the objective grows by w * L_s(theta); outer/query_loss does not.
    weighted, wm = meta.task_loss(lora, fn, s, q, cfg, has_aux=True, support_weight=0.5)
    np.testing.assert_allclose(weighted, loss + 0.5 * fn(lora, s)[0], rtol=1e-6)
    np.testing.assert_allclose(wm["outer/query_loss"], loss, rtol=1e-6)


@pytest.mark.parametrize("name", ["maml", "pooled", "imaml", "reptile"])
def test_logged_query_loss_is_the_query_loss_of_the_scored_parameters(name):
    """``outer/query_loss``: the query items' loss after adapting on the support items (MAML, iMAML),
    at the initialisation (pooled: no adaptation), after adapting on both (Reptile, in-sample) —
    what ``launch/transfer.py`` compares with the support loss."""
    base, lora = _model(jax.random.PRNGKey(0))
    sup, qry = _tasks(jax.random.PRNGKey(1), 2, 8), _tasks(jax.random.PRNGKey(2), 2, 8)
    inner = meta.InnerConfig(steps=2, lr=0.3)
    algo = meta.MetaConfig(name=name, inner=inner, support_weight=0.5 if name == "maml" else 0.0)
    step = meta.make_meta_step(lambda p, b, x: base_loss(p, b, x), algo, optax.sgd(0.0), has_aux=True, jit=False)
    _, metrics = step(meta.init_state(lora, algo, optax.sgd(0.0)), base, sup, qry)
    fn = lambda p, b: base_loss(p, base, b)
    want = []
    for t in range(2):
        s, q = jax.tree.map(lambda x: x[t], sup), jax.tree.map(lambda x: x[t], qry)
        if name == "pooled":
            params = lora
        elif name == "reptile":
            pooled = lambda p, sq: (0.5 * (fn(p, sq[0])[0] + fn(p, sq[1])[0]), {})
            params = meta.adapt(lora, pooled, (s, q), inner, has_aux=True)
        else:
            prox = dict(prox=algo.imaml_lambda) if name == "imaml" else {}
            params = meta.adapt(lora, fn, s, meta.InnerConfig(steps=2, lr=0.3, **prox), has_aux=True)
        want.append(fn(params, q)[0])
    np.testing.assert_allclose(metrics["outer/query_loss"], np.mean(want), rtol=2e-5)
    if name == "maml":  # the objective adds the weighted support loss; the logged query loss not
        pre = np.mean([fn(lora, jax.tree.map(lambda x: x[t], sup))[0] for t in range(2)])
        np.testing.assert_allclose(metrics["outer/loss"], np.mean(want) + 0.5 * pre, rtol=2e-5)


def test_adapt_for_eval_and_initial_params():
    base, lora = _model(jax.random.PRNGKey(0))
    s = jax.tree.map(lambda x: x[0], _tasks(jax.random.PRNGKey(1), 1, 8))
    algo = meta.MetaConfig(name="meta_sgd", inner=meta.InnerConfig(steps=2, lr=0.5))
    state = meta.init_state(lora, algo, optax.sgd(0.1))
    init = meta.initial_params(state.params, algo)
    assert jax.tree.structure(init) == jax.tree.structure(lora)
    ev = jax.jit(lambda mp, b, x: meta.adapt_for_eval(mp, b, x, algo, base_loss, has_aux=True))
    fn = lambda p, b: base_loss(p, base, b)[0]
    # Learned rates that differ per leaf and from inner.lr: evaluation must adapt with them.
    rates = jax.tree.map(lambda r, i: r * (1.0 + 0.3 * i), state.params["lr"],
                         jax.tree.unflatten(jax.tree.structure(state.params["lr"]),
                                            range(len(jax.tree.leaves(state.params["lr"])))))
    params = {**state.params, "lr": rates}
    got = ev(params, base, s)
    want = meta.adapt(lora, fn, s, algo.inner, lrs=rates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    uniform = meta.adapt(lora, fn, s, algo.inner)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(uniform))) > 1e-4


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="steps"):
        meta.InnerConfig(steps=-1)
    with pytest.raises(ValueError, match="optimizer 'adamw_typo'"):
        meta.InnerConfig(optimizer="adamw_typo")
    with pytest.raises(ValueError, match="adapt_pattern"):
        meta.InnerConfig(adapt_pattern="(")
    with pytest.raises(ValueError, match="remat='dots_saveable_typo'"):
        meta.InnerConfig(remat="dots_saveable_typo")
    with pytest.raises(ValueError, match="name 'mamll'"):
        meta.MetaConfig(name="mamll")
    with pytest.raises(ValueError, match="anil"):
        meta.MetaConfig(name="anil")
    with pytest.raises(ValueError, match="meta_sgd"):
        meta.MetaConfig(name="meta_sgd", inner=meta.InnerConfig(optimizer="adam"))
    with pytest.raises(ValueError, match="task axis sizes disagree"):
        meta.meta_loss(jnp.zeros(2), lambda p, b: jnp.sum(p * b), jnp.ones((3, 2)), jnp.ones((2, 2)),
                       meta.InnerConfig())
    with pytest.raises(TypeError, match="has_aux=True"):
        meta.task_loss(jnp.zeros(2), lambda p, b: jnp.sum(p * b), jnp.ones(2), jnp.ones(2),
                       meta.InnerConfig(), has_aux=True)


def test_lora_adapt_pattern_paths_start_below_tree():
    lora = LoRAParams({"layers": {"mlp": {"up": {"a": jnp.ones((2, 3)), "b": jnp.zeros((3, 2))}},
                                  "attn": {"q": {"a": jnp.ones((2, 3)), "b": jnp.zeros((3, 2))}}}}, 2.0)
    assert meta.inner.selected_indices(lora, r"layers/mlp/.*") == [2, 3]  # leaves: attn a, b; mlp a, b
    with pytest.raises(ValueError, match=r"'tree/layers/mlp/\.\*' matches none of the 4 .*layers/attn/q/a"):
        meta.inner.selected_indices(lora, r"tree/layers/mlp/.*")


@pytest.mark.parametrize("task_chunk,remat", [(None, True), (1, True), (None, False), (1, False)])
def test_forward_hvp_meta_step_equals_reverse(task_chunk, remat):
    """The jitted meta-step with ``hvp='forward'``: the frozen base is a traced argument the loss
    closes over (hoisted by ``closure_convert``), tasks are vmapped or chunked; same update."""
    base, lora = _model(jax.random.PRNGKey(0))
    s, q = _tasks(jax.random.PRNGKey(1), 4, 8), _tasks(jax.random.PRNGKey(2), 4, 8)
    out = {}
    for hvp in ("reverse", "forward"):
        algo = meta.MetaConfig("maml", meta.InnerConfig(steps=2, lr=0.3, hvp=hvp, remat=remat), task_chunk=task_chunk,
                               support_weight=0.5)
        opt = optax.sgd(1.0)
        step = meta.make_meta_step(base_loss, algo, opt, has_aux=True)
        state, metrics = step(meta.init_state(lora, algo, opt), base, s, q)
        out[hvp] = (jax.flatten_util.ravel_pytree(state.params)[0], metrics)
    delta = jax.flatten_util.ravel_pytree(lora)[0] - out["reverse"][0]
    assert float(jnp.max(jnp.abs(delta))) > 1e-3  # the step moved the parameters
    np.testing.assert_allclose(out["forward"][0], out["reverse"][0], rtol=1e-5, atol=1e-6)
    for k, v in out["reverse"][1].items():
        np.testing.assert_allclose(out["forward"][1][k], v, rtol=1e-5, err_msg=k)
