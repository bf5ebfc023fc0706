"""LoRA adapters kept in their own pytree, so gradients w.r.t. LoRA never touch the frozen base.

Conventions (shared by the encoder and the decoder):

* A base parameter tree is a nested dict. Transformer layers are *stacked*: every leaf under
  ``layers/`` has a leading layer axis ``L`` (the forward pass is a ``lax.scan`` over it).
* Dense kernels are stored ``(in, out)`` (or ``(L, in, out)`` when stacked).
* A LoRA tree mirrors the base tree for the targeted kernels only: the base leaf
  ``layers/attn/q/kernel`` of shape ``(L, in, out)`` gets ``layers/attn/q/{a: (L', in, r), b: (L', r, out)}``
  with ``L' = L - first_layer``: LoRA covers the *top* ``L'`` layers, so the frozen layers below
  ``first_layer`` can be computed once and cached (the forward infers ``first_layer`` from ``L'``).
* The adapted kernel is ``W + scale * a @ b`` with ``scale = alpha / rank`` (Hu et al., 2021, eq. 3).
  ``scale`` travels with the tree as static (non-differentiated) metadata of :class:`LoRAParams`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any

LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how.

    Attributes:
      rank: LoRA rank ``r``.
      alpha: scaling numerator; the update is ``alpha / rank * a @ b``.
      targets: regular expression, full-matched against ``/``-joined base parameter paths
        (e.g. ``layers/attn/(q|v)/kernel``); matched leaves must be kernels ``(..., in, out)``.
      first_layer: first transformer layer that gets LoRA (layers below are frozen and cacheable).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = r"layers/attn/(q|v)/kernel"
    first_layer: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@struct.dataclass
class LoRAParams:
    """A LoRA tree (``{... {"a", "b"}}`` nested dicts) plus its static scale."""

    tree: dict
    scale: float = struct.field(pytree_node=False, default=1.0)


def path_str(path) -> str:
    """Joins a ``jax.tree_util`` key path into ``a/b/c`` (dict keys, attributes and indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:  # FlattenedIndexKey and friends
            parts.append(str(k))
    return "/".join(parts)


def _set(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, keys: list[str]):
    for k in keys:
        tree = tree[k]
    return tree


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:  # re.error is not a ValueError; callers expect one for bad targets
        raise ValueError(f"LoRA targets {pattern!r} is not a valid regular expression ({e})") from e


def target_paths(base: PyTree, cfg: LoRAConfig) -> list[str]:
    """Returns the base parameter paths matched by ``cfg.targets`` (sorted).

    Raises:
      ValueError: ``cfg.targets`` is not a valid regular expression.
    """
    pattern = _compile(cfg.targets)
    leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    return sorted(p for p in (path_str(path) for path, _ in leaves) if pattern.fullmatch(p))


def init_lora(key: jax.Array, base: PyTree, cfg: LoRAConfig, dtype=jnp.float32) -> LoRAParams:
    """Creates LoRA parameters for every base kernel matched by ``cfg.targets``.

    ``a`` is drawn as PEFT does (Kaiming-uniform, bound ``1/sqrt(in)``) and ``b`` is zero, so a
    fresh adapter leaves the base model's output exactly unchanged. Works on real arrays and on
    ``jax.ShapeDtypeStruct`` trees (for ``jax.eval_shape``).

    Raises:
      ValueError: no parameter matches, a match is not a kernel, or ``first_layer`` is out of range.
    """
    paths = target_paths(base, cfg)
    if not paths:
        raise ValueError(f"LoRA targets {cfg.targets!r} match no base parameter")
    tree: dict = {}
    for i, p in enumerate(paths):
        keys = p.split("/")
        if keys[-1] != "kernel":
            raise ValueError(f"LoRA target {p!r} is not a kernel (path must end in 'kernel')")
        shape = _get(base, keys).shape
        stacked = keys[0] == LAYERS
        if len(shape) != 2 + stacked:
            raise ValueError(f"LoRA target {p!r} has shape {shape}; expected (in, out)"
                             + (" with a leading layer axis" if stacked else ""))
        lead = ()
        if stacked:
            if not 0 <= cfg.first_layer < shape[0]:
                raise ValueError(f"LoRA first_layer={cfg.first_layer} out of range for {shape[0]} layers")
            lead = (shape[0] - cfg.first_layer,)
        d_in, d_out = shape[-2:]
        bound = 1.0 / jnp.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), lead + (d_in, cfg.rank), dtype, -bound, bound)
        b = jnp.zeros(lead + (cfg.rank, d_out), dtype)
        _set(tree, keys[:-1], {"a": a, "b": b})
    return LoRAParams(tree=tree, scale=cfg.scale)


def delta(lora_leaf: dict, scale: float) -> jax.Array:
    """The dense update ``scale * a @ b`` of one LoRA leaf (batched over leading axes)."""
    return scale * jnp.einsum("...ir,...ro->...io", lora_leaf["a"], lora_leaf["b"])


def merge(base: PyTree, lora: LoRAParams) -> PyTree:
    """Folds the adapter into the base weights: ``W + scale * a @ b`` (for export and parity checks)."""
    merged = jax.tree.map(lambda x: x, base)  # fresh containers, shared leaves

    def visit(sub: dict, keys: list[str]):
        if set(sub) == {"a", "b"}:
            kernel = _get(merged, keys + ["kernel"])
            d = delta(sub, lora.scale).astype(kernel.dtype)
            n_lora = d.shape[0] if keys[0] == LAYERS else None
            if n_lora is not None and n_lora != kernel.shape[0]:
                kernel = kernel.at[kernel.shape[0] - n_lora:].add(d)
            else:
                kernel = kernel + d
            _set(merged, keys + ["kernel"], kernel)
            return
        for k, v in sub.items():
            visit(v, keys + [k])

    visit(lora.tree, [])
    return merged


def num_lora_layers(lora: LoRAParams | None) -> int:
    """How many (top) stacked layers carry LoRA; 0 for ``None`` or a tree without ``layers``."""
    if lora is None or LAYERS not in lora.tree:
        return 0
    return jax.tree.leaves(lora.tree[LAYERS])[0].shape[0]


def lora_delta(x: jax.Array, lora_leaf: dict, scale: float, precision=None) -> jax.Array:
    """``scale * (x @ a) @ b``, without materialising ``a @ b``."""
    xa = jnp.einsum("...i,ir->...r", x, lora_leaf["a"].astype(x.dtype), precision=precision)
    return scale * jnp.einsum("...r,ro->...o", xa, lora_leaf["b"].astype(x.dtype), precision=precision)


def lora_dense(x: jax.Array, params: dict, lora_leaf: dict | None, scale: float,
               precision=None) -> jax.Array:
    """``x @ W (+ b) + scale * (x @ a) @ b_lora``: the LoRA path never materialises ``a @ b``."""
    kernel = params["kernel"]
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype), precision=precision)
    if "bias" in params:
        y = y + params["bias"].astype(y.dtype)
    if lora_leaf is not None:
        y = y + lora_delta(x, lora_leaf, scale, precision)
    return y


class LoRADense(nn.Module):
    """Dense layer ``x @ kernel (+ bias)``, plus ``lora_scale * (x @ a) @ b`` when the ``lora`` collection has it.

    Shared by the encoder and the decoder: the base weights live in ``params`` and the adapter in
    the separate ``lora`` collection, so a LoRA-free apply sees a plain dense layer.

    Attributes:
      features: output width.
      use_bias: whether the layer has a bias (BERT: always; Llama: never; Qwen2: on q/k/v).
      lora_scale: ``alpha / rank``.
      dtype: if set, the input is cast to it before the matmul (the encoder's compute dtype);
        None keeps the input dtype (the decoder's residual stream is already in compute dtype).
      param_dtype: storage dtype of freshly initialised weights.
    """

    features: int
    use_bias: bool = True
    lora_scale: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        params = {"kernel": self.param("kernel", nn.initializers.normal(0.02),
                                       (x.shape[-1], self.features), self.param_dtype)}
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        leaf = None
        if self.has_variable("lora", "a"):
            leaf = {"a": self.get_variable("lora", "a"), "b": self.get_variable("lora", "b")}
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return lora_dense(x, params, leaf, self.lora_scale)

