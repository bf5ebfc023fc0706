"""Meta-gradients on quadratics ``0.5 w^T A w - b^T w`` against their closed forms, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mta_jax import meta
from mta_jax.meta import algorithms

D = 4
ALPHA = 0.1


def quad(w, batch):
    return 0.5 * w @ batch["A"] @ w - batch["b"] @ w


def quad_dict(params, batch):
    return quad(params["w"], batch)


def _spd(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q @ np.diag(rng.uniform(0.5, 2.0, size=d)) @ q.T


def _task(rng):
    return {"A": jnp.asarray(_spd(rng, D)), "b": jnp.asarray(rng.normal(size=D))}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield np.random.default_rng(0)


def _closed_form(w0, s, q, n, first_order):
    """MAML on a quadratic: w_n by explicit SGD, then ((I - a A_s)^n)^T (A_q w_n - b_q)."""
    a_s, b_s, a_q, b_q = (np.asarray(x) for x in (s["A"], s["b"], q["A"], q["b"]))
    w = np.asarray(w0)
    for _ in range(n):
        w = w - ALPHA * (a_s @ w - b_s)
    gq = a_q @ w - b_q
    if first_order:
        return gq
    jac = np.linalg.matrix_power(np.eye(D) - ALPHA * a_s, n)
    return jac.T @ gq


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("remat,hvp", [(True, "reverse"), (False, "reverse"),
                                       ("dots_with_no_batch_dims_saveable", "reverse"), (True, "forward"),
                                       (False, "forward"), ("dots_with_no_batch_dims_saveable", "forward")])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_gradient_matches_closed_form(x64, n, remat, hvp, first_order):
    rng = x64
    s, q, w0 = _task(rng), _task(rng), jnp.asarray(rng.normal(size=D))
    cfg = meta.InnerConfig(steps=n, lr=ALPHA, first_order=first_order, remat=remat, hvp=hvp)
    got = jax.grad(meta.task_loss)(w0, quad, s, q, cfg)
    want = _closed_form(w0, s, q, n, first_order)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-9)
    assert got.dtype == jnp.float64
    # The two orders must really differ here, or the test above could not tell them apart.
    other = _closed_form(w0, s, q, n, not first_order)
    assert np.max(np.abs(other - want)) > 1e-3


def test_meta_loss_is_mean_of_task_losses(x64):
    rng = x64
    tasks = [(_task(rng), _task(rng)) for _ in range(3)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
    supports, queries = stack([t[0] for t in tasks]), stack([t[1] for t in tasks])
    w0 = jnp.asarray(rng.normal(size=D))
    cfg = meta.InnerConfig(steps=2, lr=ALPHA)
    per_task = [meta.task_loss(w0, quad, s, q, cfg) for s, q in tasks]
    np.testing.assert_allclose(meta.meta_loss(w0, quad, supports, queries, cfg), np.mean(per_task), rtol=1e-12)
    g = jax.grad(meta.meta_loss)(w0, quad, supports, queries, cfg)
    want = np.mean([_closed_form(w0, s, q, 2, False) for s, q in tasks], axis=0)
    np.testing.assert_allclose(np.asarray(g), want, atol=1e-9)
    # Chunked (sequential) task mapping gives the same number as the full vmap.
    chunked = meta.meta_loss(w0, quad, supports, queries, cfg, task_chunk=2)
    np.testing.assert_allclose(chunked, np.mean(per_task), rtol=1e-12)


def test_zero_steps_is_query_loss_and_remat_agrees(x64):
    rng = x64
    s, q, w0 = _task(rng), _task(rng), jnp.asarray(rng.normal(size=D))
    zero = meta.InnerConfig(steps=0, lr=ALPHA)
    np.testing.assert_allclose(meta.task_loss(w0, quad, s, q, zero), quad(w0, q), rtol=1e-14)
    np.testing.assert_allclose(jax.grad(meta.task_loss)(w0, quad, s, q, zero), q["A"] @ w0 - q["b"], atol=1e-12)
    g_on = jax.grad(meta.task_loss)(w0, quad, s, q, meta.InnerConfig(steps=5, lr=ALPHA, remat=True))
    g_off = jax.grad(meta.task_loss)(w0, quad, s, q, meta.InnerConfig(steps=5, lr=ALPHA, remat=False))
    np.testing.assert_allclose(g_on, g_off, rtol=1e-12, atol=1e-14)


def _stacked_tasks(rng, t=2):
    ss = [_task(rng) for _ in range(t)]
    qs = [_task(rng) for _ in range(t)]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
    return ss, qs, stack(ss), stack(qs)


def _outer(name, params, supports, queries, **kw):
    inner = meta.InnerConfig(**{"steps": 3, "lr": ALPHA, **kw.pop("inner", {})})
    algo = meta.MetaConfig(name=name, inner=inner, **kw)
    loss_fn = lambda p, b: (quad_dict(p, b), {})
    mp = meta.ALGORITHMS[name].init(params, algo)
    return meta.ALGORITHMS[name].outer(mp, loss_fn, supports, queries, algo)


def test_meta_sgd_with_uniform_rates_equals_maml(x64):
    rng = x64
    _, _, supports, queries = _stacked_tasks(rng)
    params = {"w": jnp.asarray(rng.normal(size=D))}
    loss_m, g_maml, _ = _outer("maml", params, supports, queries)
    loss_s, g_msgd, _ = _outer("meta_sgd", params, supports, queries)
    np.testing.assert_allclose(loss_s, loss_m, rtol=1e-13)
    np.testing.assert_allclose(g_msgd["init"]["w"], g_maml["w"], rtol=1e-12, atol=1e-14)
    # d loss / d alpha, by a float64 central difference on the MAML loss as a function of lr.
    f = lambda a: meta.meta_loss(params, quad_dict, supports, queries, meta.InnerConfig(steps=3, lr=a))
    eps = 1e-6
    fd = (f(ALPHA + eps) - f(ALPHA - eps)) / (2 * eps)
    np.testing.assert_allclose(g_msgd["lr"]["w"], fd, rtol=1e-6)


def test_imaml_matches_implicit_function_theorem(x64):
    rng = x64
    lam = 1.5
    ss, qs, supports, queries = _stacked_tasks(rng)
    theta = jnp.asarray(rng.normal(size=D))
    # Enough inner steps to converge to phi*, and D CG iterations (exact for a D-dim SPD system).
    _, g, _ = _outer("imaml", {"w": theta}, supports, queries, imaml_lambda=lam, imaml_cg_steps=D,
                     inner={"steps": 300, "lr": 0.2})
    want = []
    for s, q in zip(ss, qs):
        a_s, b_s, a_q, b_q = (np.asarray(x) for x in (s["A"], s["b"], q["A"], q["b"]))
        phi = np.linalg.solve(a_s + lam * np.eye(D), b_s + lam * np.asarray(theta))
        # d phi*/d theta = lam (A_s + lam I)^-1 = (I + A_s / lam)^-1 (symmetric).
        want.append(np.linalg.solve(np.eye(D) + a_s / lam, a_q @ phi - b_q))
    np.testing.assert_allclose(np.asarray(g["w"]), np.mean(want, axis=0), atol=1e-9)


def test_anil_subset_adaptation_and_a_pattern_matching_nothing(x64):
    rng = x64
    s, q = _task(rng), _task(rng)
    params = {"head": jnp.asarray(rng.normal(size=D)), "body": jnp.asarray(rng.normal(size=D))}
    loss = lambda p, b: quad(p["head"] + p["body"], b)
    # A pattern that selects nothing would silently turn meta-learning into multi-task learning
    # (it did: 'tree/layers/mlp/.*' on a LoRA tree, whose paths start at 'layers/').
    none = meta.InnerConfig(steps=3, lr=ALPHA, adapt_pattern="nothing_matches")
    with pytest.raises(ValueError, match=r"adapt_pattern 'nothing_matches' matches none of the 2 .*body, head"):
        meta.adapt(params, loss, s, none)
    head_only = meta.InnerConfig(steps=3, lr=ALPHA, adapt_pattern="head")
    adapted = meta.adapt(params, loss, s, head_only)
    np.testing.assert_array_equal(adapted["body"], params["body"])
    assert np.max(np.abs(np.asarray(adapted["head"] - params["head"]))) > 1e-3
    # The frozen leaf still gets the full second-order meta-gradient (outer loop only):
    # w = head + body, so d/d body of L_q(head_n + body) with head_n = (I - aA)^n... + terms in body.
    g = jax.grad(lambda p: meta.task_loss(p, loss, s, q, head_only))(params)
    eps = 1e-6
    e0 = jnp.zeros(D).at[0].set(1.0)
    fd = (meta.task_loss({**params, "body": params["body"] + eps * e0}, loss, s, q, head_only)
          - meta.task_loss({**params, "body": params["body"] - eps * e0}, loss, s, q, head_only)) / (2 * eps)
    np.testing.assert_allclose(g["body"][0], fd, rtol=1e-7)


def test_reptile_direction_matches_closed_form(x64):
    rng = x64
    ss, qs, supports, queries = _stacked_tasks(rng)
    theta = jnp.asarray(rng.normal(size=D))
    n = 3
    algo = meta.MetaConfig(name="reptile", inner=meta.InnerConfig(steps=n, lr=ALPHA))
    state = meta.init_state({"w": theta}, algo, optax.sgd(1.0))
    step = meta.make_meta_step(lambda p, base, b: quad_dict(p, b) * base, algo, optax.sgd(1.0))
    state, _ = step(state, jnp.float64(1.0), supports, queries)
    dirs = []
    for s, q in zip(ss, qs):
        a = 0.5 * (np.asarray(s["A"]) + np.asarray(q["A"]))
        b = 0.5 * (np.asarray(s["b"]) + np.asarray(q["b"]))
        star = np.linalg.solve(a, b)
        # phi_n - phi* = (I - aA)^n (theta - phi*)  =>  theta - phi_n = (I - (I - aA)^n)(theta - phi*)
        m = np.eye(D) - np.linalg.matrix_power(np.eye(D) - ALPHA * a, n)
        dirs.append(m @ (np.asarray(theta) - star))
    np.testing.assert_allclose(np.asarray(state.params["w"]), np.asarray(theta) - np.mean(dirs, axis=0), atol=1e-9)


def test_pooled_is_gradient_of_mean_support_query_loss(x64):
    rng = x64
    ss, qs, supports, queries = _stacked_tasks(rng, t=3)
    theta = jnp.asarray(rng.normal(size=D))
    loss, g, metrics = _outer("pooled", {"w": theta}, supports, queries)
    want_g = np.mean([0.5 * (s["A"] @ theta - s["b"] + q["A"] @ theta - q["b"]) for s, q in zip(ss, qs)], axis=0)
    want_l = np.mean([0.5 * (quad(theta, s) + quad(theta, q)) for s, q in zip(ss, qs)])
    np.testing.assert_allclose(np.asarray(g["w"]), want_g, atol=1e-12)
    np.testing.assert_allclose(loss, want_l, rtol=1e-12)
    np.testing.assert_allclose(metrics["inner/loss_pre"], np.mean([quad(theta, s) for s in ss]), rtol=1e-12)


@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("first_order,hvp", [(False, "reverse"), (True, "reverse"), (False, "forward")])
def test_support_weight_adds_the_pre_adaptation_support_gradient(x64, n, first_order, hvp):
    rng = x64
    s, q, w0 = _task(rng), _task(rng), jnp.asarray(rng.normal(size=D))
    cfg = meta.InnerConfig(steps=n, lr=ALPHA, first_order=first_order, hvp=hvp)
    lam = 0.7
    got = jax.grad(meta.task_loss)(w0, quad, s, q, cfg, support_weight=lam)
    want = _closed_form(w0, s, q, n, first_order) + lam * (np.asarray(s["A"]) @ np.asarray(w0) - np.asarray(s["b"]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-9)
    value = meta.task_loss(w0, quad, s, q, cfg, support_weight=lam)
    np.testing.assert_allclose(value, meta.task_loss(w0, quad, s, q, cfg) + lam * quad(w0, s), rtol=1e-12)
    # Through the algorithm registry (has_aux path): the same gradient, task-averaged.
    aux_quad = lambda w, b: (quad(w, b), {"l": quad(w, b)})
    algo = meta.MetaConfig("fomaml" if first_order else "maml", meta.InnerConfig(steps=n, lr=ALPHA, hvp=hvp),
                           support_weight=lam)
    stack = lambda t: jax.tree.map(lambda x: x[None], t)
    _, grads, _ = meta.ALGORITHMS[algo.name].outer(w0, aux_quad, stack(s), stack(q), algo)
    np.testing.assert_allclose(np.asarray(grads), want, rtol=0, atol=1e-9)


def test_support_weight_rejected_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="support_weight applies to the MAML family"):
        meta.MetaConfig("reptile", support_weight=0.5)
    with pytest.raises(ValueError, match="support_weight must be >= 0"):
        meta.MetaConfig("maml", support_weight=-1.0)


def test_conjugate_gradient_solves_indefinite_systems(x64):
    """I + H/lambda is indefinite where H has eigenvalues below -lambda (LoRA's init has negative
    curvature); CG must keep taking its steps there, not stall on p.Ap < 0."""
    a = jnp.diag(jnp.array([1.0, -0.5]))
    x = algorithms.conjugate_gradient(lambda v: {"w": a @ v["w"]}, {"w": jnp.ones(2)}, steps=2)
    np.testing.assert_allclose(np.asarray(x["w"]), [1.0, -2.0], atol=1e-12)
    rng = x64
    m = rng.normal(size=(D, D))
    sym = m + m.T  # a random symmetric, in general indefinite, matrix
    b = rng.normal(size=D)
    x = algorithms.conjugate_gradient(lambda v: {"w": sym @ v["w"]}, {"w": jnp.asarray(b)}, steps=D)
    np.testing.assert_allclose(np.asarray(x["w"]), np.linalg.solve(sym, b), rtol=1e-6)


def test_configurations_that_cannot_work_are_rejected_up_front():
    with pytest.raises(ValueError, match="meta_sgd.*hvp='reverse'"):
        meta.MetaConfig("meta_sgd", meta.InnerConfig(hvp="forward"))
    with pytest.raises(ValueError, match="reptile.*steps >= 1"):
        meta.MetaConfig("reptile", meta.InnerConfig(steps=0))
    # iMAML never differentiates its inner loop: hvp is irrelevant there and must not clash with its prox
    assert algorithms._imaml_inner(meta.MetaConfig("imaml", meta.InnerConfig(hvp="forward"))).prox == 1.0
