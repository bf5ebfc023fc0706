"""The inner loop: ``adapt`` takes a few differentiable optimiser steps on one task's support set.

``adapt`` is a ``lax.scan`` over inner steps whose body is wrapped in ``jax.checkpoint`` (``remat``),
so differentiating through ``n`` steps stores only the per-step carry (the adapted parameters and
the optimiser state), never the activations of the support forward/backward passes. First-order
MAML (Finn et al., 2017, sec. 5.2) is the *same* code path with ``stop_gradient`` on the inner
gradients, so ``d phi_n / d theta = I`` and the outer gradient is the query gradient at ``phi_n``.
With ``hvp="forward"`` a plain-SGD step instead carries a custom VJP that takes the Hessian-vector
product forward-over-reverse, from a stored linearization of the support gradient or (``remat``)
by recomputing it from the step's input.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mta_jax.model.lora import LoRAParams, path_str
from mta_jax.model.remat import checkpoint_layer

PyTree = Any
# loss_fn(params, batch) -> scalar, or -> (scalar, aux dict) when has_aux.
LossFn = Callable[[PyTree, PyTree], Any]

# Each entry maps the inner learning rate to an optax transformation (updates are *added*).
# Adam gets eps_root > 0 because d sqrt(nu) / d nu is infinite at nu = 0, and LoRA's ``a`` factors
# have exactly zero gradient while ``b`` is still zero: without it the second-order gradient is NaN
# (the optax docs recommend eps_root > 0 whenever one differentiates through Adam).
INNER_OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam": lambda lr: optax.adam(lr, eps_root=1e-16),
}


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    """How a task adapts in the inner loop.

    Attributes:
      steps: number of inner optimiser steps ``n`` (0: no adaptation).
      lr: inner learning rate ``alpha`` (the initial value of learned rates for Meta-SGD).
      first_order: drop second-order terms (``stop_gradient`` on the inner gradients).
      remat: ``jax.checkpoint`` the step body so memory does not grow with stored activations
        (``True``: keep only the carry), or a policy name (``jax.checkpoint_policies`` or
        :data:`mta_jax.model.remat.POLICIES`): keep what it saves of each step (e.g.
        ``"dots_with_no_batch_dims_saveable"``: the matmul outputs), a middle ground whose memory
        grows with steps by that much. Applied only with
        ``steps > 1``: a single step's residuals are all needed by the outer backward anyway, so
        checkpointing it would only add a recomputation (measured on the MiniLM benchmark: 23%
        slower and 18% more XLA temp memory).
      optimizer: a name in :data:`INNER_OPTIMIZERS` or any ``optax.GradientTransformation``
        (used as is; ``lr`` is then ignored except by Meta-SGD's initial rates).
      clip_norm: if set, inner gradients are clipped to this global norm before the optimiser.
      adapt_pattern: regex full-matched against ``/``-joined leaf paths choosing the leaves that
        adapt in the inner loop (ANIL-style); ``None`` adapts every leaf. For a
        :class:`~mta_jax.model.lora.LoRAParams` the paths are those of its ``.tree``
        (e.g. ``layers/attn/v/b``), for any other pytree they come from ``lora.path_str``.
      prox: ``lambda`` of a proximal term ``lambda/2 ||phi - theta||^2`` added to the inner
        objective (iMAML, Rajeswaran et al., 2019, eq. 3); 0 disables it.
      hvp: how the outer gradient passes back through an inner step ``phi' = phi - lr g(phi)``.
        ``"reverse"``: JAX differentiates the step itself (reverse-over-reverse; the step's
        residuals are stored or, with ``remat``, recomputed). ``"forward"``: a custom VJP returns
        ``v - lr H v + c g`` with the Hessian-vector product ``H v`` taken forward-over-reverse
        (the Jacobian-vector product of the support gradient). With ``remat=True`` (and more than
        one step) each step stores only its input parameters and the outer backward recomputes the
        support pass inside one ``jax.jvp``: memory flat in steps. Otherwise each step keeps the
        ``jax.linearize``-d support gradient (with a policy name, what the policy saves of it) and
        the outer backward evaluates only its tangent half: faster, memory growing with steps.
        Same gradient to rounding; ``"forward"`` needs plain SGD (``optimizer="sgd"``, no
        ``clip_norm``, ``prox`` or Meta-SGD rates).
    """

    steps: int = 1
    lr: float = 1e-2
    first_order: bool = False
    remat: bool | str = True
    optimizer: str | optax.GradientTransformation = "sgd"
    clip_norm: float | None = None
    adapt_pattern: str | None = None
    prox: float = 0.0
    hvp: str = "reverse"

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"InnerConfig.steps must be an int >= 0, got {self.steps!r}")
        if not math.isfinite(self.lr):
            raise ValueError(f"InnerConfig.lr must be finite, got {self.lr!r}")
        if isinstance(self.optimizer, str) and self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"InnerConfig.optimizer {self.optimizer!r} unknown; "
                             f"choose one of {sorted(INNER_OPTIMIZERS)} or pass an optax transformation")
        if not isinstance(self.optimizer, (str, optax.GradientTransformation)):
            raise TypeError(f"InnerConfig.optimizer must be a str or optax.GradientTransformation, "
                            f"got {type(self.optimizer).__name__}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"InnerConfig.clip_norm must be > 0 or None, got {self.clip_norm!r}")
        checkpoint_layer(lambda x: x, self.remat)  # a bad policy name fails here, naming the field
        if self.prox < 0:
            raise ValueError(f"InnerConfig.prox must be >= 0, got {self.prox!r}")
        if self.hvp not in ("reverse", "forward"):
            raise ValueError(f"InnerConfig.hvp must be 'reverse' or 'forward', got {self.hvp!r}")
        if self.hvp == "forward" and (self.optimizer != "sgd" or self.clip_norm is not None or self.prox):
            raise ValueError("InnerConfig.hvp='forward' differentiates plain SGD steps only: it needs "
                             f"optimizer='sgd' (got {self.optimizer!r}), clip_norm=None (got "
                             f"{self.clip_norm!r}) and prox=0 (got {self.prox!r})")
        if self.adapt_pattern is not None:
            try:
                re.compile(self.adapt_pattern)
            except re.error as e:
                raise ValueError(f"InnerConfig.adapt_pattern {self.adapt_pattern!r} is not a regex: {e}") from e


class InnerAux(NamedTuple):
    """Per-step logging output of :func:`adapt`.

    Attributes:
      losses: ``(steps,)`` support loss (without the proximal term) *before* each inner update,
        so ``losses[0]`` is the loss at the initialisation.
      aux: the loss function's aux output at each step, stacked on a leading ``steps`` axis
        (``None`` without ``has_aux``, or with 0 steps).
    """

    losses: jax.Array
    aux: Any


def inner_optimizer(cfg: InnerConfig) -> optax.GradientTransformation:
    """The optax transformation named (or given) by ``cfg.optimizer``, at learning rate ``cfg.lr``."""
    if isinstance(cfg.optimizer, optax.GradientTransformation):
        return cfg.optimizer
    return INNER_OPTIMIZERS[cfg.optimizer](cfg.lr)


def call_loss(loss_fn: LossFn, params: PyTree, batch: PyTree, has_aux: bool):
    """Calls ``loss_fn`` and returns ``(loss, aux)`` whatever its convention (aux ``None`` if absent)."""
    out = loss_fn(params, batch)
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"has_aux=True but loss_fn returned {type(out).__name__}, not (loss, aux)")
    return out


def selected_indices(params: PyTree, pattern: str | None) -> list[int]:
    """Indices, in ``jax.tree.leaves`` order, of the leaves whose path full-matches ``pattern``.

    ``None`` selects every leaf. A :class:`~mta_jax.model.lora.LoRAParams`' first path key is its
    ``tree`` attribute, which is dropped so patterns read like base parameter paths
    (``layers/mlp/up/a``).

    Raises:
      ValueError: ``pattern`` matches no leaf of a non-empty tree (naming the paths it could match):
        an inner loop that silently adapts nothing trains plain multi-task learning under a
        meta-learning name.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if pattern is None:
        return list(range(len(flat)))
    rx = re.compile(pattern)
    drop = 1 if isinstance(params, LoRAParams) else 0
    paths = [path_str(p[drop:]) for p, _ in flat]
    idx = [i for i, path in enumerate(paths) if rx.fullmatch(path)]
    if flat and not idx:
        shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        raise ValueError(f"InnerConfig.adapt_pattern {pattern!r} matches none of the {len(paths)} "
                         f"parameter paths ({shown})")
    return idx


def partition(params: PyTree, pattern: str | None):
    """Splits ``params`` into the leaves matching ``pattern``, the others, and a function putting them back.

    Returns:
      ``(selected, rest, combine)``: lists of leaves (pytrees); ``combine(new_selected)`` rebuilds
      the full tree with the other leaves unchanged, ``combine(new_selected, new_rest)`` replaces
      those too.
    """
    leaves, treedef = jax.tree.flatten(params)
    idx = selected_indices(params, pattern)
    chosen = set(idx)
    rest_idx = [i for i in range(len(leaves)) if i not in chosen]

    def combine(selected, rest=None):
        out = list(leaves)
        for i, x in zip(idx, selected):
            out[i] = x
        for i, x in zip(rest_idx, rest if rest is not None else ()):
            out[i] = x
        return treedef.unflatten(out)

    return [leaves[i] for i in idx], [leaves[i] for i in rest_idx], combine


def _clip_global_norm(grads, max_norm: float):
    # The double ``where`` keeps the derivative of the norm finite at zero gradient, which matters
    # when second-order MAML differentiates through the clipping.
    sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))
    safe = jnp.where(sq > 0, sq, 1.0)
    norm = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
    factor = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


def _dense(ct):
    """A cotangent as an array (``symbolic_zeros`` passes unused ones as ``SymbolicZero``)."""
    if isinstance(ct, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(ct.shape, ct.dtype)
    return ct


def _sgd_step_forward_hvp(loss_fn: Callable, lr: float, n_consts: int, remat: bool | str):
    """``step(sub, rest, support, *consts) -> (sub - lr g, (loss, aux))``, its VJP forward-over-reverse.

    ``loss_fn(sub, rest, support, *consts) -> (loss, aux)`` is closure-converted: ``sub`` are the
    adapted leaves, ``rest`` the others (ANIL: they learn in the outer loop only, but still shape
    the inner gradient), ``consts`` (``n_consts`` of them) the arrays the user's loss closes over
    (the frozen base). For ``phi' = phi - lr g(phi)`` and the reported ``loss = L(phi)``, the
    cotangents ``(v, c)`` map to ``v - lr H_ss v + c g_s`` for ``sub`` and ``-lr H_rs v + c g_r``
    for ``rest``: the Jacobian-vector product of the gradient in the direction ``(v, 0)`` gives both
    Hessian blocks. ``remat=True``: the residuals are the step's inputs and the backward pass runs
    one ``jax.jvp`` of the gradient (recomputing the support pass). Otherwise the forward pass
    ``jax.linearize``-s the gradient and keeps the linearization (all of it with ``False``; what a
    ``jax.checkpoint_policies`` name saves of it, recomputing the rest): the backward pass then
    evaluates only the tangent half.
    """
    def grads_and_out(sub, rest, support, consts):
        f = lambda s, r: loss_fn(s, r, support, *consts)
        out, grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(sub, rest)
        return grads, out

    def sgd(sub, g_sub):
        return [p - lr * g for p, g in zip(sub, g_sub)]

    def plain_step(sub, rest, support, consts):
        (g_sub, _), out = grads_and_out(sub, rest, support, consts)
        return sgd(sub, g_sub), out

    @jax.custom_vjp
    def step(sub, rest, support, *consts):
        return plain_step(sub, rest, support, consts)

    def fwd(sub, rest, support, *consts):
        if any(c.perturbed for c in consts):
            raise ValueError("InnerConfig.hvp='forward' treats the arrays loss_fn closes over as constants, "
                             "but one of them is being differentiated; pass it inside params or batch, "
                             "or use hvp='reverse'")
        primal = lambda p: isinstance(p, jax.custom_derivatives.CustomVJPPrimal)
        sub, rest, support = [jax.tree.map(lambda p: p.value, a, is_leaf=primal) for a in (sub, rest, support)]
        consts = [c.value for c in consts]
        if remat is True:
            return plain_step(sub, rest, support, consts), (sub, rest, support, consts)
        grad_fn = checkpoint_layer(lambda s, r: grads_and_out(s, r, support, consts), remat)
        (g_sub, g_rest), lin, out = jax.linearize(grad_fn, sub, rest, has_aux=True)
        return (sgd(sub, g_sub), out), (lin, g_sub, g_rest, rest)

    def bwd(res, cts):
        v, (c_loss, _) = cts  # the aux output is a metric: its cotangent is dropped
        v = [_dense(x) for x in v]
        if remat is not True:
            lin, g_sub, g_rest, rest = res
            h_sub, h_rest = lin(v, [jnp.zeros_like(r) for r in rest])
        else:
            sub, rest, support, consts = res
            grad_fn = lambda s, r: grads_and_out(s, r, support, consts)[0]
            (g_sub, g_rest), (h_sub, h_rest) = jax.jvp(grad_fn, (sub, rest), (v, [jnp.zeros_like(r) for r in rest]))
        c = _dense(c_loss)
        cot_sub = [vi - lr * h + c.astype(g.dtype) * g for vi, h, g in zip(v, h_sub, g_sub)]
        cot_rest = [-lr * h + c.astype(g.dtype) * g for h, g in zip(h_rest, g_rest)]
        return (cot_sub, cot_rest, None) + (None,) * n_consts

    step.defvjp(fwd, bwd, symbolic_zeros=True)
    return step


def adapt(params: PyTree, loss_fn: LossFn, support: PyTree, cfg: InnerConfig, *,
          has_aux: bool = False, return_aux: bool = False, lrs: PyTree | None = None):
    """Adapts ``params`` to one task by ``cfg.steps`` optimiser steps on ``support``.

    Differentiable end to end: with the default SGD, ``jax.grad`` through ``adapt`` gives the exact
    MAML Jacobian ``prod_k (I - lr * H_k)`` (second order) or the identity (``first_order``).

    Args:
      params: any pytree of float arrays (a ``LoRAParams``, a dict, ...): the initialisation.
      loss_fn: ``loss_fn(params, batch) -> loss`` (``-> (loss, aux)`` when ``has_aux``).
      support: the task's support batch (any pytree ``loss_fn`` accepts).
      cfg: the inner-loop configuration.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      return_aux: also return an :class:`InnerAux` with the per-step support losses.
      lrs: Meta-SGD learned rates, a pytree like ``params`` whose leaves broadcast against the
        parameter leaves (per-leaf scalars or per-element arrays); the step is then
        ``phi - lrs * g`` and ``cfg.optimizer`` must be ``"sgd"``.

    Returns:
      The adapted parameters (same structure as ``params``), plus an :class:`InnerAux` if
      ``return_aux``.
    """
    if lrs is not None and cfg.optimizer != "sgd":
        raise ValueError(f"learned inner rates (Meta-SGD) need optimizer='sgd', got {cfg.optimizer!r}")
    sub0, rest0, combine = partition(params, cfg.adapt_pattern)
    if lrs is not None:
        if jax.tree.structure(lrs) != jax.tree.structure(params):
            raise ValueError("Meta-SGD rates must have the structure of params: "
                             f"{jax.tree.structure(lrs)} vs {jax.tree.structure(params)}")
        lr_leaves = jax.tree.leaves(lrs)
        lr_sub = [lr_leaves[i] for i in selected_indices(params, cfg.adapt_pattern)]
    opt = inner_optimizer(cfg)
    anchor = sub0  # theta of the proximal term; callers stop its gradient if they need to (iMAML)

    def objective(sub):
        loss, aux = call_loss(loss_fn, combine(sub), support, has_aux)
        total = loss
        if cfg.prox:
            total = total + 0.5 * cfg.prox * sum(
                jnp.sum(jnp.square(p - a)) for p, a in zip(sub, anchor))
        return total, (loss, aux)

    forward_hvp = cfg.hvp == "forward" and not cfg.first_order
    if forward_hvp and lrs is not None:
        raise ValueError("InnerConfig.hvp='forward' does not support Meta-SGD learned rates; use hvp='reverse'")
    if forward_hvp:
        plain = lambda s, r, b: call_loss(loss_fn, combine(s, r), b, has_aux)
        converted, consts = jax.closure_convert(plain, sub0, rest0, support)
        # One step keeps its linearization whatever ``remat`` says (as for "reverse", the outer
        # backward needs all of it); more steps recompute or keep it as ``remat`` asks.
        sgd_step = _sgd_step_forward_hvp(converted, cfg.lr, len(consts), cfg.remat if cfg.steps > 1 else False)

    def step(carry, _):
        sub, opt_state = carry
        if forward_hvp:
            sub, (loss, aux) = sgd_step(sub, rest0, support, *consts)
            return (sub, opt_state), (loss, aux)
        grads, (loss, aux) = jax.grad(objective, has_aux=True)(sub)
        if cfg.first_order:
            grads = jax.lax.stop_gradient(grads)
        if cfg.clip_norm is not None:
            grads = _clip_global_norm(grads, cfg.clip_norm)
        if lrs is None:
            updates, opt_state = opt.update(grads, opt_state, sub)
        else:
            updates = [-r.astype(g.dtype) * g for r, g in zip(lr_sub, grads)]
        return (optax.apply_updates(sub, updates), opt_state), (loss, aux)

    if cfg.steps > 1 and not forward_hvp:  # a forward-HVP step applies ``remat`` itself
        step = checkpoint_layer(step, cfg.remat)

    if cfg.steps == 0 or not sub0:
        # Nothing to adapt (0 steps, or an empty parameter tree): the identity map.
        adapted = params
        losses = jnp.zeros((0,), jnp.float32)
        aux = None
        if return_aux and cfg.steps > 0:
            loss, a = call_loss(loss_fn, params, support, has_aux)
            losses = jnp.broadcast_to(loss, (cfg.steps,))
            aux = None if a is None else jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.steps,) + jnp.shape(x)), a)
    else:
        (sub, _), (losses, aux) = jax.lax.scan(step, (sub0, opt.init(sub0)), None, length=cfg.steps)
        adapted = combine(sub)
    if return_aux:
        return adapted, InnerAux(losses=losses, aux=aux)
    return adapted

