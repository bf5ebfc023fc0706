"""Meta-learning algorithms as outer-gradient rules over one shared inner loop, registered by name.

Every algorithm is an :class:`Algorithm` of pure functions; :data:`ALGORITHMS` maps the names
``maml``, ``fomaml``, ``meta_sgd``, ``anil``, ``reptile``, ``imaml`` and ``pooled`` to them. Inside
this module a loss function always has the ``(params, batch) -> (loss, aux dict)`` convention
(:mod:`mta_jax.meta.step` wraps plain losses), so metrics flow the same way for every variant.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mta_jax.meta.inner import InnerConfig, LossFn, adapt
from mta_jax.meta.outer import map_tasks, mean_metrics, task_loss

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Which meta-learning algorithm, with its inner loop and algorithm-specific knobs.

    Attributes:
      name: a key of :data:`ALGORITHMS`.
      inner: the inner-loop configuration shared by all algorithms.
      imaml_lambda: iMAML's proximal strength ``lambda`` (Rajeswaran et al., 2019, eq. 3).
      imaml_cg_steps: conjugate-gradient iterations solving ``(I + H / lambda) g = grad L_q``.
      task_chunk: ``None`` vmaps all tasks at once; ``k`` runs ``k`` tasks at a time (less memory).
      post_loss: MAML-family metrics include ``inner/loss_post`` (one extra support forward per
        task; turn off when timing against loops that do not log it).
      support_weight: MAML family (maml, fomaml, anil, meta_sgd): the outer objective adds
        ``support_weight * L_s(theta)``, the support loss before adaptation (0: plain MAML).
    """

    name: str = "maml"
    inner: InnerConfig = InnerConfig()
    imaml_lambda: float = 1.0
    imaml_cg_steps: int = 5
    task_chunk: int | None = None
    post_loss: bool = True
    support_weight: float = 0.0

    def __post_init__(self):
        if self.name not in ALGORITHMS:
            raise ValueError(f"MetaConfig.name {self.name!r} unknown; choose one of {sorted(ALGORITHMS)}")
        if not self.imaml_lambda > 0:
            raise ValueError(f"MetaConfig.imaml_lambda must be > 0, got {self.imaml_lambda!r}")
        if self.imaml_cg_steps < 1:
            raise ValueError(f"MetaConfig.imaml_cg_steps must be >= 1, got {self.imaml_cg_steps!r}")
        if self.support_weight < 0:
            raise ValueError(f"MetaConfig.support_weight must be >= 0, got {self.support_weight!r}")
        if self.support_weight and self.name in ("reptile", "imaml", "pooled"):
            raise ValueError(f"MetaConfig.support_weight applies to the MAML family, not {self.name!r}")
        if self.task_chunk is not None and self.task_chunk < 1:
            raise ValueError(f"MetaConfig.task_chunk must be >= 1 or None, got {self.task_chunk!r}")
        if self.name == "anil" and self.inner.adapt_pattern is None:
            raise ValueError("MetaConfig(name='anil') needs inner.adapt_pattern (the leaves that adapt)")
        if self.name == "imaml" and self.inner.adapt_pattern is not None:
            raise ValueError("MetaConfig(name='imaml') adapts every leaf; inner.adapt_pattern must be None")
        if self.name == "meta_sgd" and self.inner.optimizer != "sgd":
            raise ValueError(f"MetaConfig(name='meta_sgd') needs inner.optimizer='sgd', got {self.inner.optimizer!r}")
        if self.name == "meta_sgd" and self.inner.hvp == "forward":
            raise ValueError("MetaConfig(name='meta_sgd') learns per-leaf inner rates, which "
                             "inner.hvp='forward' (plain SGD steps only) cannot differentiate; use hvp='reverse'")
        if self.name == "reptile" and self.inner.steps < 1:
            raise ValueError("MetaConfig(name='reptile') needs inner.steps >= 1: its direction theta - phi "
                             "is zero without an inner step")


class Algorithm(NamedTuple):
    """One meta-learning algorithm as pure functions.

    Attributes:
      init: ``(params, cfg) -> meta_params``: the meta-parameters learned in the outer loop.
      initial: ``(meta_params) -> params``: the initialisation used at test time.
      outer: ``(meta_params, loss_fn, supports, queries, cfg) -> (loss, grads, metrics)``:
        the outer loss, its (meta-)gradient w.r.t. ``meta_params`` and task-mean metrics.
      adapt: ``(meta_params, loss_fn, support, cfg) -> params``: test-time adaptation to one task.
    """

    init: Callable
    initial: Callable
    outer: Callable
    adapt: Callable


def _identity_init(params, cfg):
    del cfg
    return params


def _identity(meta_params):
    return meta_params


def _task_mean(x):
    # Mean over the task axis only: per-task gradients keep their parameter shape.
    return jnp.mean(x, axis=0)


def _sg(tree):
    return jax.lax.stop_gradient(tree)


# --- MAML family: the gradient of task_loss, per task (second order, first order, subset). ----

def _maml_inner(cfg: MetaConfig) -> InnerConfig:
    return dataclasses.replace(cfg.inner, first_order=True) if cfg.name == "fomaml" else cfg.inner


def _per_task_grads(loss_of_params, meta_params, supports, queries, cfg):
    """Task-mean ``(loss, grads, metrics)`` of ``loss_of_params(meta_params, s, q) -> (loss, metrics)``.

    Each task's gradient is taken inside the task map and only the gradients are averaged, so with
    ``task_chunk = k`` the peak memory is one chunk's second-order graph (as in a PyTorch loop that
    calls ``backward`` per task), not the graph of every task: differentiating *through* a
    sequential map over tasks would keep the residuals of all of them for the backward pass.
    """
    def per_task(s, q):
        (loss, metrics), grads = jax.value_and_grad(loss_of_params, has_aux=True)(meta_params, s, q)
        return loss, grads, metrics

    return jax.tree.map(_task_mean, map_tasks(per_task, supports, queries, cfg.task_chunk))


def _maml_outer(meta_params, loss_fn, supports, queries, cfg):
    inner = _maml_inner(cfg)
    f = lambda p, s, q: task_loss(p, loss_fn, s, q, inner, has_aux=True, post_loss=cfg.post_loss,
                                  support_weight=cfg.support_weight)
    return _per_task_grads(f, meta_params, supports, queries, cfg)


def _maml_adapt(meta_params, loss_fn, support, cfg):
    return adapt(meta_params, loss_fn, support, _maml_inner(cfg), has_aux=True)


# --- Meta-SGD (Li et al., 2017): per-leaf inner rates are meta-parameters. ------------------

def _msgd_init(params, cfg):
    lr = jax.tree.map(lambda x: jnp.full((), cfg.inner.lr, jnp.result_type(x)), params)
    return {"init": params, "lr": lr}


def _msgd_outer(meta_params, loss_fn, supports, queries, cfg):
    f = lambda mp, s, q: task_loss(mp["init"], loss_fn, s, q, cfg.inner, has_aux=True, lrs=mp["lr"],
                                   post_loss=cfg.post_loss, support_weight=cfg.support_weight)
    return _per_task_grads(f, meta_params, supports, queries, cfg)


def _msgd_adapt(meta_params, loss_fn, support, cfg):
    return adapt(meta_params["init"], loss_fn, support, cfg.inner, has_aux=True, lrs=meta_params["lr"])


def _task_metrics(pre, post, query_loss, aux) -> dict:
    """One task's logged metrics, the keys ``task_loss`` logs for MAML: the support loss before and
    after adaptation, the query loss of the parameters the query is scored with, and the outer aux
    means."""
    return {"inner/loss_pre": pre, "inner/loss_post": post, "outer/query_loss": query_loss,
            **mean_metrics(aux, "outer/")}


# --- Pooled multi-task fine-tuning and Reptile: the task's data is support and query together. --

def _pooled_loss(loss_fn: LossFn) -> LossFn:
    """``(params, (support, query)) -> mean of the two losses (and of their aux)``."""
    def f(params, sq):
        return _pooled_parts(loss_fn, params, sq)[0]
    return f


def _pooled_parts(loss_fn: LossFn, params, sq):
    """``((pooled loss, mean aux), support loss, query loss)`` of one task's ``(support, query)``."""
    (ls, a_s), (lq, a_q) = loss_fn(params, sq[0]), loss_fn(params, sq[1])
    return (0.5 * (ls + lq), jax.tree.map(lambda x, y: 0.5 * (x + y), a_s, a_q)), ls, lq


def _pooled_outer(meta_params, loss_fn, supports, queries, cfg):
    def loss_and_metrics(p, s, q):
        (loss, aux), ls, lq = _pooled_parts(loss_fn, p, (s, q))
        ls, lq = _sg(ls), _sg(lq)
        return loss, _task_metrics(ls, ls, lq, aux)  # no adaptation: pre = post

    return _per_task_grads(loss_and_metrics, meta_params, supports, queries, cfg)


def _reptile_outer(meta_params, loss_fn, supports, queries, cfg):
    """Reptile (Nichol et al., 2018): the direction ``theta - phi`` after adapting on the task's data.

    The returned "gradient" is ``mean_tasks(theta - phi)``, so outer SGD with rate ``eps`` is
    ``theta + eps (phi - theta)``. ``loss`` is the pooled task loss at ``theta`` (before adaptation).
    """
    pooled = _pooled_loss(loss_fn)
    inner = dataclasses.replace(cfg.inner, first_order=True, remat=False)  # never differentiated
    theta = _sg(meta_params)

    def per_task(s, q):
        phi, aux = adapt(theta, pooled, (s, q), inner, has_aux=True, return_aux=True)
        (post, post_aux), _, post_q = _pooled_parts(loss_fn, phi, (s, q))
        direction = jax.tree.map(lambda t, p: t - p, theta, phi)
        pre = aux.losses[0] if inner.steps > 0 else post
        # Task-data losses after adaptation: in-sample for Reptile, which adapts on support and
        # query together (its "support" loss is the pooled one and its query loss no transfer).
        return pre, direction, _task_metrics(pre, post, post_q, post_aux)

    return jax.tree.map(_task_mean, map_tasks(per_task, supports, queries, cfg.task_chunk))


def _reptile_adapt(meta_params, loss_fn, support, cfg):
    return adapt(meta_params, loss_fn, support, dataclasses.replace(cfg.inner, first_order=True), has_aux=True)


# --- iMAML (Rajeswaran et al., 2019): implicit gradient, memory independent of inner steps. ----

def _imaml_inner(cfg: MetaConfig) -> InnerConfig:
    # The inner loop is never differentiated (the implicit gradient replaces it), so the way its
    # steps would be differentiated (``hvp``) does not matter; "reverse" admits the prox term.
    return dataclasses.replace(cfg.inner, prox=cfg.imaml_lambda, first_order=True, remat=False, hvp="reverse")


def _vdot(x, y):
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def conjugate_gradient(matvec: Callable, b: PyTree, steps: int) -> PyTree:
    """``steps`` iterations of conjugate gradient for ``matvec(x) = b`` from ``x = 0``, over pytrees.

    A fixed iteration count (no tolerance test) keeps the cost static and the loop batchable
    under ``vmap`` (``jax.scipy.sparse.linalg.cg`` fails under vmap on tree-structured arguments
    here). A zero ``p·Ap`` (an exact early solve) or residual is guarded against dividing by zero;
    negative curvature is not special-cased: ``I + H/lambda`` can be indefinite (at LoRA's init the
    Hessian has negative eigenvalues), and plain CG steps still solve a symmetric indefinite system
    unless ``p·Ap`` vanishes.
    """
    axpy = lambda a, x, y: jax.tree.map(lambda u, v: a * u + v, x, y)

    def body(_, carry):
        x, r, p, rs = carry
        ap = matvec(p)
        pap = _vdot(p, ap)
        alpha = jnp.where(pap != 0, rs / jnp.where(pap != 0, pap, 1.0), 0.0)
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rs_new = _vdot(r, r)
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
        return x, r, axpy(beta, p, r), rs_new

    x0 = jax.tree.map(jnp.zeros_like, b)
    x, *_ = jax.lax.fori_loop(0, steps, body, (x0, b, b, _vdot(b, b)))
    return x


def _imaml_outer(meta_params, loss_fn, supports, queries, cfg):
    """Per task: ``phi* ~ argmin L_s(phi) + lambda/2 ||phi - theta||^2`` by the inner loop, then
    ``g = (I + H_s(phi*) / lambda)^{-1} grad L_q(phi*)`` by conjugate gradient (eq. 7), where the
    Hessian enters only through Hessian-vector products (forward-over-reverse)."""
    lam = cfg.imaml_lambda
    inner = _imaml_inner(cfg)
    theta = _sg(meta_params)

    def per_task(s, q):
        phi, aux = adapt(theta, loss_fn, s, inner, has_aux=True, return_aux=True)
        phi = _sg(phi)
        (loss, qaux), gq = jax.value_and_grad(loss_fn, has_aux=True)(phi, q)
        grad_s = jax.grad(lambda p: loss_fn(p, s)[0])

        def matvec(v):
            hv = jax.jvp(grad_s, (phi,), (v,))[1]
            return jax.tree.map(lambda a, b: a + b / lam, v, hv)

        g = conjugate_gradient(matvec, gq, cfg.imaml_cg_steps)
        post = loss_fn(phi, s)[0]
        pre = aux.losses[0] if inner.steps > 0 else post
        return loss, g, _task_metrics(pre, post, loss, qaux)

    return jax.tree.map(_task_mean, map_tasks(per_task, supports, queries, cfg.task_chunk))


def _imaml_adapt(meta_params, loss_fn, support, cfg):
    return adapt(meta_params, loss_fn, support, _imaml_inner(cfg), has_aux=True)


ALGORITHMS: dict[str, Algorithm] = {
    "maml": Algorithm(_identity_init, _identity, _maml_outer, _maml_adapt),
    "fomaml": Algorithm(_identity_init, _identity, _maml_outer, _maml_adapt),
    "anil": Algorithm(_identity_init, _identity, _maml_outer, _maml_adapt),
    "meta_sgd": Algorithm(_msgd_init, lambda mp: mp["init"], _msgd_outer, _msgd_adapt),
    "reptile": Algorithm(_identity_init, _identity, _reptile_outer, _reptile_adapt),
    "imaml": Algorithm(_identity_init, _identity, _imaml_outer, _imaml_adapt),
    "pooled": Algorithm(_identity_init, _identity, _pooled_outer, _reptile_adapt),
}
