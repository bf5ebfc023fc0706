"""Meta-gradients of a tiny nonlinear LoRA model against float64 central finite differences."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import meta
from mta_jax.model.lora import LoRAParams, lora_dense

D_IN, HID, N_CLS, RANK, N_ITEMS = 4, 6, 3, 2, 5


def _base(key):
    k1, k2 = jax.random.split(key)
    return {"l1": {"kernel": jax.random.normal(k1, (D_IN, HID)) / 2, "bias": jnp.zeros(HID)},
            "l2": {"kernel": jax.random.normal(k2, (HID, N_CLS)) / 2}}


def _lora(key):
    ks = jax.random.split(key, 4)
    # b is *not* zero here: with b = 0 the gradient w.r.t. a vanishes and FD would check less.
    leaf = lambda ka, kb, i, o: {"a": 0.5 * jax.random.normal(ka, (i, RANK)),
                                 "b": 0.5 * jax.random.normal(kb, (RANK, o))}
    return LoRAParams(tree={"l1": leaf(ks[0], ks[1], D_IN, HID), "l2": leaf(ks[2], ks[3], HID, N_CLS)}, scale=2.0)


def _batch(key):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (N_ITEMS, D_IN)), "y": jax.random.randint(ky, (N_ITEMS,), 0, N_CLS)}


def make_loss(base):
    def loss(lora, batch):
        h = jnp.tanh(lora_dense(batch["x"], base["l1"], lora.tree["l1"], lora.scale))
        logits = lora_dense(h, base["l2"], lora.tree["l2"], lora.scale)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))
    return loss


def _fd_grad(f, params, eps=1e-6):
    """Central differences along every coordinate (vmapped over the unit directions)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    eye = jnp.eye(flat.size, dtype=flat.dtype)
    g = jax.jit(jax.vmap(lambda e: (f(unravel(flat + eps * e)) - f(unravel(flat - eps * e))) / (2 * eps)))(eye)
    return g, flat.size


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture
def problem():
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(0)
        k = jax.random.split(key, 4)
        base = _base(k[0])
        yield make_loss(base), _lora(k[1]), _batch(k[2]), _batch(k[3])


@pytest.mark.parametrize("optimizer,clip", [("sgd", None), ("adam", None), ("sgd", 0.3)])
def test_second_order_matches_finite_differences(problem, optimizer, clip):
    loss, lora, s, q = problem
    lr = 0.05 if optimizer == "adam" else 0.5
    cfg = meta.InnerConfig(steps=3, lr=lr, optimizer=optimizer, clip_norm=clip)
    f = lambda p: meta.task_loss(p, loss, s, q, cfg)
    fd, n = _fd_grad(f, lora)
    g = jax.flatten_util.ravel_pytree(jax.grad(f)(lora))[0]
    assert g.dtype == jnp.float64 and n == g.size
    assert _rel(g, fd) < 1e-6, _rel(g, fd)
    # First order is a different (approximate) gradient, measurably far from the true one.
    f1 = lambda p: meta.task_loss(p, loss, s, q, meta.InnerConfig(steps=3, lr=lr, optimizer=optimizer,
                                                                   clip_norm=clip, first_order=True))
    g1 = jax.flatten_util.ravel_pytree(jax.grad(f1)(lora))[0]
    assert _rel(g1, fd) > 1e-3, _rel(g1, fd)


def test_clipping_is_active_in_clip_case(problem):
    loss, lora, s, _ = problem
    g = jax.grad(loss)(lora, s)
    assert float(jax.flatten_util.ravel_pytree(g)[0] @ jax.flatten_util.ravel_pytree(g)[0]) ** 0.5 > 0.3
    a = meta.adapt(lora, loss, s, meta.InnerConfig(steps=1, lr=0.5, clip_norm=0.3))
    step = jax.flatten_util.ravel_pytree(jax.tree.map(lambda x, y: x - y, lora, a))[0]
    np.testing.assert_allclose(float(jnp.linalg.norm(step)), 0.5 * 0.3, rtol=1e-12)


def test_meta_sgd_rate_gradient_matches_finite_differences(problem):
    loss, lora, s, q = problem
    cfg = meta.InnerConfig(steps=2, lr=0.3)
    algo = meta.MetaConfig(name="meta_sgd", inner=cfg)
    mp = meta.ALGORITHMS["meta_sgd"].init(lora, algo)
    # Distinct rates per leaf, so a mix-up between leaves would show.
    mp["lr"] = jax.tree.map(lambda r, i: r * (1.0 + 0.1 * i), mp["lr"],
                            jax.tree.unflatten(jax.tree.structure(mp["lr"]), list(range(4))))
    f = lambda m: meta.meta_loss(m["init"], loss, jax.tree.map(lambda x: x[None], s),
                                 jax.tree.map(lambda x: x[None], q), cfg, lrs=m["lr"])
    fd, _ = _fd_grad(f, mp)
    g = jax.flatten_util.ravel_pytree(jax.grad(f)(mp))[0]
    assert _rel(g, fd) < 1e-6, _rel(g, fd)
    _, g_alg, _ = meta.ALGORITHMS["meta_sgd"].outer(
        mp, lambda p, b: (loss(p, b), {}), jax.tree.map(lambda x: x[None], s), jax.tree.map(lambda x: x[None], q), algo)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(g_alg)[0], g, rtol=1e-10)


def test_anil_on_lora_paths(problem):
    loss, lora, s, q = problem
    # LoRAParams paths are matched without the ``tree/`` attribute prefix, like base paths.
    cfg = meta.InnerConfig(steps=2, lr=0.5, adapt_pattern="l2/.*")
    adapted = meta.adapt(lora, loss, s, cfg)
    np.testing.assert_array_equal(adapted.tree["l1"]["a"], lora.tree["l1"]["a"])
    assert float(jnp.max(jnp.abs(adapted.tree["l2"]["b"] - lora.tree["l2"]["b"]))) > 1e-4
    assert adapted.scale == lora.scale
    f = lambda p: meta.task_loss(p, loss, s, q, cfg)
    fd, _ = _fd_grad(f, lora)
    assert _rel(jax.flatten_util.ravel_pytree(jax.grad(f)(lora))[0], fd) < 1e-6


@pytest.mark.parametrize("remat", [True, False, "dots_with_no_batch_dims_saveable"])
@pytest.mark.parametrize("pattern", [None, "l2/.*"])
def test_forward_hvp_matches_finite_differences(problem, pattern, remat):
    """``hvp='forward'`` (custom VJP, Hessian-vector products by jvp-of-grad, recomputed or from a
    stored linearization): the same meta-gradient, ANIL's outer-only leaves (the mixed Hessian
    block) and the support-loss term included."""
    loss, lora, s, q = problem
    cfg = meta.InnerConfig(steps=3, lr=0.5, hvp="forward", adapt_pattern=pattern, remat=remat)
    f = lambda p: meta.task_loss(p, loss, s, q, cfg, support_weight=0.3)
    fd, _ = _fd_grad(f, lora)
    g = jax.flatten_util.ravel_pytree(jax.grad(f)(lora))[0]
    assert _rel(g, fd) < 1e-6, _rel(g, fd)
    rev = jax.grad(lambda p: meta.task_loss(p, loss, s, q, dataclasses.replace(cfg, hvp="reverse"),
                                            support_weight=0.3))(lora)
    np.testing.assert_allclose(g, jax.flatten_util.ravel_pytree(rev)[0], rtol=1e-10, atol=1e-12)


def test_forward_hvp_refuses_what_it_cannot_differentiate(problem):
    loss, lora, s, q = problem
    for bad in ({"optimizer": "adam"}, {"clip_norm": 0.3}, {"prox": 0.1}):
        with pytest.raises(ValueError, match="hvp='forward'"):
            meta.InnerConfig(steps=1, hvp="forward", **bad)
    with pytest.raises(ValueError, match="must be 'reverse' or 'forward'"):
        meta.InnerConfig(hvp="backward")
    cfg = meta.InnerConfig(steps=1, lr=0.5, hvp="forward")
    with pytest.raises(ValueError, match="Meta-SGD"):
        meta.adapt(lora, loss, s, cfg, lrs=jax.tree.map(lambda x: 0.5, lora))
    # A closed-over array that is itself differentiated would get no gradient through the step:
    # refused, instead of a silently wrong gradient.
    scale_loss = lambda w: meta.task_loss(lora, lambda p, b: w * loss(p, b), s, q, cfg)
    with pytest.raises(ValueError, match="closes over"):
        jax.grad(scale_loss)(1.0)
    # Not differentiated, a closed-over array is fine (the frozen base is one).
    assert np.isfinite(float(scale_loss(1.0)))
