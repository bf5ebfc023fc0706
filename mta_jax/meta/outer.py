"""The outer objective: ``task_loss`` (adapt on support, loss on query) and ``meta_loss`` (mean over tasks).

``jax.grad(task_loss)`` with the default SGD inner loop is exactly the MAML meta-gradient (Finn et
al., 2017, eq. 1); ``meta_loss`` maps ``task_loss`` over a leading task axis with ``vmap`` so that,
under ``jit`` with tasks sharded on a mesh axis, the task axis becomes data parallelism.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mta_jax.meta.inner import InnerConfig, LossFn, adapt, call_loss

PyTree = Any


def mean_metrics(aux: dict | None, prefix: str) -> dict:
    """A loss's aux dict as scalar metrics: each entry's mean, its name prefixed."""
    if aux is None:
        return {}
    if not isinstance(aux, dict):
        raise TypeError(f"loss_fn aux must be a dict of arrays, got {type(aux).__name__}")
    return {f"{prefix}{k}": jnp.mean(v) for k, v in aux.items()}


def task_loss(params: PyTree, loss_fn: LossFn, support: PyTree, query: PyTree, cfg: InnerConfig, *,
              has_aux: bool = False, lrs: PyTree | None = None, post_loss: bool = True,
              support_weight: float = 0.0):
    """Adapts ``params`` on ``support`` and returns the loss of the adapted parameters on ``query``.

    With ``support_weight = w > 0`` the objective is ``L_q(adapt(theta)) + w * L_s(theta)``: the
    support items also train the initialisation directly, as they do in pooled fine-tuning, so
    every labelled item of the episode reaches the outer gradient. ``L_s(theta)`` is the value the
    first inner step computes anyway (no extra forward pass).

    Args:
      params: the initialisation ``theta`` (any pytree).
      loss_fn: ``loss_fn(params, batch) -> loss`` (``-> (loss, aux dict)`` when ``has_aux``).
      support: the task's support batch.
      query: the task's query batch.
      cfg: the inner-loop configuration.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; then this returns ``(loss, metrics)``.
      lrs: Meta-SGD per-leaf inner rates (see :func:`~mta_jax.meta.inner.adapt`).
      post_loss: with ``has_aux``, also report ``inner/loss_post``, which costs one extra support
        forward pass (its gradient is never taken).
      support_weight: weight of the pre-adaptation support loss in the objective (0: MAML).

    Returns:
      The query loss, or ``(loss, metrics)`` with ``has_aux``: ``metrics`` holds
      ``inner/loss_pre`` and (if ``post_loss``) ``inner/loss_post``, the support loss before and
      after adaptation, ``outer/query_loss``, the adapted query loss alone (without the support
      term), and every query aux entry as ``outer/<key>``.
    """
    if not has_aux and not support_weight:
        return loss_fn(adapt(params, loss_fn, support, cfg, lrs=lrs), query)
    adapted, inner = adapt(params, loss_fn, support, cfg, has_aux=has_aux, return_aux=True, lrs=lrs)
    query_loss, qaux = call_loss(loss_fn, adapted, query, has_aux)
    if cfg.steps > 0:
        pre = inner.losses[0]  # L_s(theta), differentiable: the first step's forward
    else:
        pre, _ = call_loss(loss_fn, params, support, has_aux)
    loss = query_loss + support_weight * pre if support_weight else query_loss
    if not has_aux:
        return loss
    metrics = {"inner/loss_pre": jax.lax.stop_gradient(pre),
               "outer/query_loss": jax.lax.stop_gradient(query_loss)}
    if post_loss:
        post = pre if cfg.steps == 0 else call_loss(loss_fn, jax.lax.stop_gradient(adapted), support, True)[0]
        metrics["inner/loss_post"] = jax.lax.stop_gradient(post)
    metrics.update(mean_metrics(qaux, "outer/"))
    return loss, metrics


def num_tasks(supports: PyTree, queries: PyTree) -> int:
    """The common leading (task) axis length of every leaf of ``supports`` and ``queries``.

    Raises:
      ValueError: a leaf is a scalar or the leading sizes disagree (naming the leaf path).
    """
    sizes = {}
    for name, tree in (("supports", supports), ("queries", queries)):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shape = jnp.shape(x)
            where = f"{name}{jax.tree_util.keystr(path)}"
            if not shape:
                raise ValueError(f"{where} is a scalar; stacked task batches need a leading task axis")
            sizes[where] = shape[0]
    if not sizes:
        raise ValueError("supports and queries hold no arrays")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"task axis sizes disagree: {sizes}")
    return next(iter(sizes.values()))


def map_tasks(fn, supports: PyTree, queries: PyTree, task_chunk: int | None = None):
    """``fn(support, query)`` over the leading task axis: ``vmap``, or ``lax.map`` over chunks.

    ``task_chunk=None`` vmaps all tasks at once (fastest, and what sharding over tasks needs);
    an int ``k`` runs ``k`` tasks at a time (vmapped inside a sequential ``lax.map``). The forward
    then holds one chunk at a time, but a gradient *through* the map keeps every chunk's residuals:
    to bound the memory of a meta-gradient, take per-task gradients inside ``fn``, as the algorithms
    behind :func:`~mta_jax.meta.step.make_meta_step` do.
    """
    num_tasks(supports, queries)
    if task_chunk is None:
        return jax.vmap(fn)(supports, queries)
    return jax.lax.map(lambda sq: fn(*sq), (supports, queries), batch_size=task_chunk)


def meta_loss(params: PyTree, loss_fn: LossFn, supports: PyTree, queries: PyTree, cfg: InnerConfig, *,
              has_aux: bool = False, lrs: PyTree | None = None, task_chunk: int | None = None,
              post_loss: bool = True, support_weight: float = 0.0):
    """Mean of :func:`task_loss` over the leading task axis of ``supports`` / ``queries``.

    Args:
      params: the shared initialisation ``theta``.
      loss_fn: as for :func:`task_loss`.
      supports: support batches stacked on a leading task axis ``T``.
      queries: query batches stacked on the same leading axis.
      cfg: the inner-loop configuration.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; then returns ``(loss, metrics)`` averaged over tasks.
      lrs: Meta-SGD per-leaf inner rates.
      task_chunk: see :func:`map_tasks`.
      post_loss, support_weight: see :func:`task_loss`.

    Returns:
      The mean query loss after adaptation (and the mean metrics with ``has_aux``).
    """
    out = map_tasks(lambda s, q: task_loss(params, loss_fn, s, q, cfg, has_aux=has_aux, lrs=lrs,
                                             post_loss=post_loss, support_weight=support_weight),
                    supports, queries, task_chunk)
    return jax.tree.map(jnp.mean, out)
