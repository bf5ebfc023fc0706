"""The meta-training step: outer gradient of a registered algorithm plus an optax update, jitted once.

The frozen backbone is an explicit argument of ``meta_step`` (``loss_fn(params, base, batch)``), so a
large base is a jit *argument* shared across steps rather than a constant baked into the program.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mta_jax.meta.algorithms import ALGORITHMS, MetaConfig

PyTree = Any
# loss_fn(params, base, batch) -> scalar, or -> (scalar, aux dict) when has_aux.
BaseLossFn = Callable[[PyTree, PyTree, PyTree], Any]


class MetaState(NamedTuple):
    """What changes during meta-training (the frozen base is not part of it).

    Attributes:
      step: int32 scalar, number of meta-updates taken.
      params: the meta-parameters (the LoRA initialisation; ``{"init", "lr"}`` for Meta-SGD).
      opt_state: the outer optimiser's state.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree


def _with_aux(loss_fn: BaseLossFn, has_aux: bool) -> BaseLossFn:
    if has_aux:
        def checked(params, base, batch):
            out = loss_fn(params, base, batch)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
                raise TypeError(f"has_aux=True: loss_fn must return (loss, aux dict), got {type(out).__name__}")
            return out
        return checked
    return lambda params, base, batch: (loss_fn(params, base, batch), {})


def init_state(params: PyTree, algo: MetaConfig, outer_opt: optax.GradientTransformation) -> MetaState:
    """Builds the initial :class:`MetaState` from model parameters (e.g. a fresh LoRA tree).

    Args:
      params: the parameters the inner loop adapts.
      algo: the meta-learning configuration (Meta-SGD adds learned rates to the meta-parameters).
      outer_opt: the outer (meta) optimiser.
    """
    # A copy: the jitted step donates the state, which must not delete the caller's arrays.
    meta_params = jax.tree.map(jnp.copy, ALGORITHMS[algo.name].init(params, algo))
    return MetaState(step=jnp.zeros((), jnp.int32), params=meta_params, opt_state=outer_opt.init(meta_params))


def initial_params(meta_params: PyTree, algo: MetaConfig) -> PyTree:
    """The parameters to start from at test time (Meta-SGD: the ``"init"`` part; else ``meta_params``)."""
    return ALGORITHMS[algo.name].initial(meta_params)


def adapt_for_eval(meta_params: PyTree, base: PyTree, support: PyTree, algo: MetaConfig,
                   loss_fn: BaseLossFn, *, has_aux: bool = False) -> PyTree:
    """Test-time adaptation to one task's support set, the way ``algo`` adapts during training.

    Jittable: close over ``algo`` and ``loss_fn`` (``functools.partial``) and jit the rest. Meta-SGD
    uses its learned rates, iMAML its proximal inner objective; with ``inner.steps == 0`` (e.g. the
    pooled fine-tuning baseline) this returns :func:`initial_params`.

    Args:
      meta_params: ``MetaState.params``.
      base: the frozen backbone, passed through to ``loss_fn``.
      support: one task's support batch (no task axis).
      algo: the meta-learning configuration.
      loss_fn: ``loss_fn(params, base, batch)``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    """
    fn = _with_aux(loss_fn, has_aux)
    return ALGORITHMS[algo.name].adapt(meta_params, lambda p, b: fn(p, base, b), support, algo)


def make_meta_step(loss_fn: BaseLossFn, algo: MetaConfig, outer_opt: optax.GradientTransformation, *,
                   has_aux: bool = False, jit: bool = True, in_shardings: Any = None,
                   out_shardings: Any = None, donate: bool = True):
    """Builds ``meta_step(state, base, supports, queries) -> (state, metrics)``.

    The step computes the algorithm's outer loss and meta-gradient for all tasks (stacked on a
    leading axis of ``supports`` / ``queries``), applies ``outer_opt`` and returns scalar metrics:
    ``outer/loss``, ``outer/grad_norm``, ``inner/loss_pre``, ``inner/loss_post``, ``outer/query_loss``
    (the query loss alone, without a support term) and every aux key of ``loss_fn`` (query side,
    task mean) as ``outer/<key>``. It performs no host synchronisation.

    Args:
      loss_fn: ``loss_fn(params, base, batch) -> loss`` (``(loss, aux dict)`` with ``has_aux``).
      algo: the meta-learning configuration.
      outer_opt: the outer optimiser.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      jit: return the ``jax.jit``-ed step (state donated); ``False`` returns the plain function
        for callers that jit it themselves (e.g. with their own shardings).
      in_shardings: passed to ``jax.jit`` when given (a 4-tuple matching the arguments).
      out_shardings: passed to ``jax.jit`` when given.
      donate: donate the state buffers (argument 0) to the update.
    """
    algorithm = ALGORITHMS[algo.name]
    fn = _with_aux(loss_fn, has_aux)

    def meta_step(state: MetaState, base: PyTree, supports: PyTree, queries: PyTree):
        task_fn = lambda p, b: fn(p, base, b)  # base is a traced argument, not a constant
        loss, grads, metrics = algorithm.outer(state.params, task_fn, supports, queries, algo)
        updates, opt_state = outer_opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["outer/loss"] = loss
        metrics["outer/grad_norm"] = optax.tree.norm(grads)
        return MetaState(state.step + 1, params, opt_state), metrics

    if not jit:
        return meta_step
    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(meta_step, donate_argnums=(0,) if donate else (), **kwargs)
