"""Llama / Qwen2 decoder (GQA, RoPE, RMSNorm, SwiGLU) with LoRA, as pure functions over stacked layers.

Einsum axis letters, used throughout: ``b`` batch, ``t`` query position, ``s`` key position,
``d`` model width, ``k`` key/value heads, ``g`` query heads per kv head (``num_heads = k * g``),
``e`` head dim, ``v`` vocabulary.

Parameter tree (the LoRA target regexes of :mod:`mta_jax.model.lora` match these paths)::

    embed (V, D); final_norm/scale (D,); lm_head (D, V)  [absent when tied: logits = h @ embed.T]
    layers/attn/{q,k,v,o}/kernel (L, in, out) [+ q,k,v bias (L, out) for Qwen2]
    layers/attn_norm/scale, layers/mlp_norm/scale (L, D); layers/mlp/{gate,up,down}/kernel
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mta_jax.model.lora import LAYERS, LoRADense, LoRAParams, num_lora_layers, path_str
from mta_jax.model.remat import checkpoint_layer

# Large but finite: a fully masked row (a left-pad query) softmaxes to uniform instead of NaN.
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 ``rope_type="llama3"`` frequency scaling (HF ``_compute_llama3_parameters``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@jax.tree_util.register_static  # hashable and leafless: jit / eval_shape / grad accept it as an argument
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and numerics of a Llama / Qwen2 decoder.

    ``dtype`` is the compute dtype (matmul inputs and the residual stream, as in HF bf16 models);
    norms, RoPE, softmax and the logit accumulation are always at least fp32. ``param_dtype`` is the storage dtype of freshly initialised or loaded weights.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False
    arch: str = "llama"
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}; supported: {sorted(ARCHS)}")

    @classmethod
    def from_hf(cls, hf_config: dict) -> "DecoderConfig":
        """Builds a config from a HF ``config.json`` dict; see :func:`mta_jax.model.decoder_hf.config_from_hf`."""
        from mta_jax.model import decoder_hf  # deferred: decoder_hf imports this module

        return decoder_hf.config_from_hf(hf_config)

    @classmethod
    def qwen2_0_5b(cls) -> "DecoderConfig":
        """Qwen2-0.5B (Qwen/Qwen2-0.5B ``config.json``)."""
        return cls(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                   head_dim=64, intermediate_size=4864, rope_theta=1e6, rms_norm_eps=1e-6,
                   qkv_bias=True, tie_embeddings=True, max_position=32768, arch="qwen2")

    @classmethod
    def llama3_8b(cls) -> "DecoderConfig":
        """Meta-Llama-3-8B (``config.json``)."""
        return cls(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   head_dim=128, intermediate_size=14336, rope_theta=500000.0, rms_norm_eps=1e-5,
                   max_position=8192, arch="llama")


ARCHS = ("llama", "qwen2")


def _inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """RoPE inverse frequencies, computed in float32 exactly as HF does (a compile-time constant)."""
    exps = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv = (np.float32(1.0) / np.float32(cfg.rope_theta) ** exps).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between.
    wavelen = 2 * math.pi / inv
    low_wl = s.original_max_position / s.low_freq_factor
    high_wl = s.original_max_position / s.high_freq_factor
    scaled = np.where(wavelen > low_wl, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF ``x * cos + rotate_half(x) * sin`` (half-rotation layout), in fp32 or wider."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(wide)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return (xf * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in (at least) fp32; the result is cast back before the learned scale, as HF does."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    cfg: DecoderConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x, cos, sin, allowed, cache=None, index=None):
        """``allowed (b, t, s)``: which keys each query sees. With ``cache`` (``{"k", "v"}``, each
        ``(b, S, kv, e)``), this call's keys and values are written at slots ``[index, index + t)``
        and the queries attend over all ``S`` slots; returns ``(out, updated cache)``."""
        c = self.cfg
        dense = functools.partial(LoRADense, use_bias=False, lora_scale=self.lora_scale,
                                  param_dtype=jnp.dtype(c.param_dtype))
        b, t, _ = x.shape
        kv, g, e = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
        # Query head n = kv_head * g + j, matching HF's repeat_kv (each kv head serves g consecutive heads).
        q = dense(c.num_heads * e, use_bias=c.qkv_bias, name="q")(x).reshape(b, t, kv, g, e)
        k = dense(kv * e, use_bias=c.qkv_bias, name="k")(x).reshape(b, t, kv, e)
        v = dense(kv * e, use_bias=c.qkv_bias, name="v")(x).reshape(b, t, kv, e)
        q = _rotate(q, cos[:, :, None, None], sin[:, :, None, None])
        k = _rotate(k, cos[:, :, None], sin[:, :, None])
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
            cache = {"k": k, "v": v}
        wide = jnp.promote_types(x.dtype, jnp.float32)
        scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=wide) / math.sqrt(e)
        scores = jnp.where(allowed[:, None, None], scores, _MASKED)
        probs = checkpoint_name(jax.nn.softmax(scores, axis=-1).astype(x.dtype), "attn_probs")
        out = jnp.einsum("bkgts,bske->btkge", probs, v).reshape(b, t, c.num_heads * e)
        out = dense(c.hidden_size, name="o")(out)
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    cfg: DecoderConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = functools.partial(LoRADense, use_bias=False, lora_scale=self.lora_scale,
                                  param_dtype=jnp.dtype(c.param_dtype))
        h = nn.silu(dense(c.intermediate_size, name="gate")(x)) * dense(c.intermediate_size, name="up")(x)
        return dense(c.hidden_size, name="down")(h)


class DecoderBlock(nn.Module):
    """One pre-norm transformer block; its parameters are one slice of the stacked ``layers`` tree."""

    cfg: DecoderConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x, cos, sin, allowed, cache=None, index=None):
        """As :class:`Attention`: with a ``cache`` returns ``(out, updated cache)``."""
        c, pd = self.cfg, jnp.dtype(self.cfg.param_dtype)
        a = Attention(c, self.lora_scale, name="attn")(
            RMSNorm(c.rms_norm_eps, pd, name="attn_norm")(x), cos, sin, allowed, cache, index)
        if cache is not None:
            a, cache = a
        h = x + a
        out = h + MLP(c, self.lora_scale, name="mlp")(RMSNorm(c.rms_norm_eps, pd, name="mlp_norm")(h))
        return out if cache is None else (out, cache)


def init_params(cfg: DecoderConfig, key: jax.Array) -> dict:
    """Random parameters (normal(0.02) kernels and embeddings, unit norms, zero biases), HF-style.

    Works under ``jax.eval_shape`` to obtain the tree of a full-size model without allocating it.
    """
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    pd = jnp.dtype(cfg.param_dtype)
    x = jnp.zeros((1, 1, cfg.hidden_size), jnp.dtype(cfg.dtype))
    rope = jnp.zeros((1, 1, cfg.head_dim), jnp.float32)
    allowed = jnp.ones((1, 1, 1), bool)
    block = DecoderBlock(cfg)
    layers = jax.vmap(lambda k: block.init(k, x, rope, rope, allowed)["params"])(
        jax.random.split(k_layers, cfg.num_layers))
    params = {"embed": 0.02 * jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size), pd),
              LAYERS: layers, "final_norm": {"scale": jnp.ones((cfg.hidden_size,), pd)}}
    if not cfg.tie_embeddings:
        params["lm_head"] = 0.02 * jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size), pd)
    return params


def _check_lora(params: dict, lora: LoRAParams) -> None:
    """Every LoRA leaf must sit on a stacked kernel of this model with matching shapes (trace-time check)."""
    if set(lora.tree) != {LAYERS}:
        raise ValueError(f"decoder LoRA supports only stacked-layer targets; got top-level keys {sorted(lora.tree)}")
    n = num_lora_layers(lora)
    for path, a in jax.tree_util.tree_flatten_with_path(lora.tree[LAYERS])[0]:
        p = path_str(path)
        module, leaf = p.rsplit("/", 1)
        node = params[LAYERS]
        try:
            for key in module.split("/"):
                node = node[key]
            kernel = node["kernel"]
        except (KeyError, TypeError):
            raise ValueError(f"LoRA leaf layers/{p} has no base kernel layers/{module}/kernel") from None
        _, d_in, d_out = kernel.shape
        if leaf not in ("a", "b") or a.ndim != 3 or a.shape[0] != n or n > kernel.shape[0] or (
                a.shape[1] != d_in if leaf == "a" else a.shape[2] != d_out):
            raise ValueError(f"LoRA leaf layers/{p} has shape {a.shape}; base kernel is {kernel.shape} "
                             f"and the adapter covers the top {n} layers")


def _check_inputs(cfg: DecoderConfig, ids, mask) -> None:
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be (batch, length)")
    if ids.shape[1] > cfg.max_position:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position={cfg.max_position}")


def _scan_layers(cfg, layers, lora_layers, scale, x, cos, sin, allowed, cache=None, index=None):
    """``lax.scan`` of :class:`DecoderBlock` over the leading layer axis (rematerialised if ``cfg.remat``).

    With a ``cache`` (decoding, see :func:`decode`) each layer also reads and writes its slice of it,
    nothing is rematerialised, and the result is ``(x, updated cache)``.
    """
    block = DecoderBlock(cfg, scale)

    def body(h, xs):
        p, lo, c = xs
        variables = {"params": p} if lo is None else {"params": p, "lora": lo}
        out = block.apply(variables, h, cos, sin, allowed, c, index)
        return out if c is not None else (out, None)

    if cache is None:
        body = checkpoint_layer(body, cfg.remat)
    x, cache = jax.lax.scan(body, x, (layers, lora_layers, cache))
    return x if cache is None else (x, cache)


def _rope(cfg: DecoderConfig, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of rotary positions ``pos (B, T)``, each ``(B, T, head_dim)`` in fp32."""
    freqs = pos[..., None].astype(jnp.float32) * _inv_freq(cfg)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def _stacks(cfg: DecoderConfig, params: dict, lora: LoRAParams | None) -> list[tuple[int, int, Any, float]]:
    """The layer stacks to scan in order: ``(first, stop, lora layers or None, lora scale)`` — the
    frozen bottom without LoRA variables (so XLA sees a plain dense stack), then the adapted top."""
    n_lora = 0
    if lora is not None:
        _check_lora(params, lora)
        n_lora = num_lora_layers(lora)
    split = cfg.num_layers - n_lora
    stacks = [(0, split, None, 1.0)] if split > 0 else []
    if n_lora:
        stacks.append((split, cfg.num_layers, lora.tree[LAYERS], lora.scale))
    return stacks


def _layer_slice(tree, first: int, stop: int, num_layers: int):
    return tree if (first, stop) == (0, num_layers) else jax.tree.map(lambda a: a[first:stop], tree)


def mask_positions(mask: jax.Array) -> jax.Array:
    """Rotary positions of a padded batch, ``cumsum(mask) - 1`` (0 on left padding), as HF computes
    ``position_ids`` from the attention mask."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def _attention_inputs(cfg: DecoderConfig, ids, mask, positions, segments):
    """``(cos, sin, allowed)`` of a batch: rotary tables and the ``(B, T, S)`` visibility mask."""
    _check_inputs(cfg, ids, mask)
    mask = mask.astype(bool)
    if positions is not None and positions.shape != ids.shape:
        raise ValueError(f"positions {positions.shape} must match ids {ids.shape}")
    pos = mask_positions(mask) if positions is None else positions
    cos, sin = _rope(cfg, pos)
    t = ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    allowed = causal[None] & mask[:, None, :]  # (b, t, s)
    if segments is not None:
        if segments.shape != ids.shape:
            raise ValueError(f"segments {segments.shape} must match ids {ids.shape}")
        seen = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
        allowed = allowed & seen
    return cos, sin, allowed


def bottom_states(cfg: DecoderConfig, params: dict, ids: jax.Array, mask: jax.Array, stop: int, *,
                  positions: jax.Array | None = None, segments: jax.Array | None = None) -> jax.Array:
    """The residual stream after the first ``stop`` layers, without LoRA or final norm, ``(B, T, D)``.

    What :func:`hidden_states` takes as ``bottom=(x, stop)``: adapters whose LoRA starts at or above
    layer ``stop`` (and the base model) all continue from it, so an evaluation of several methods
    runs the frozen bottom once. Arguments as in :func:`hidden_states`; ``stop`` is static.
    """
    if not 0 <= stop <= cfg.num_layers:
        raise ValueError(f"bottom_states: stop={stop} is outside [0, {cfg.num_layers}]")
    cos, sin, allowed = _attention_inputs(cfg, ids, mask, positions, segments)
    x = jnp.take(params["embed"], ids, axis=0).astype(jnp.dtype(cfg.dtype))
    if stop:
        layers = _layer_slice(params[LAYERS], 0, stop, cfg.num_layers)
        x = _scan_layers(cfg, layers, None, 1.0, x, cos, sin, allowed)
    return x


def hidden_states(cfg: DecoderConfig, params: dict, ids: jax.Array, mask: jax.Array,
                  lora: LoRAParams | None = None, *, positions: jax.Array | None = None,
                  segments: jax.Array | None = None, bottom: tuple[jax.Array, int] | None = None) -> jax.Array:
    """Final-norm hidden states ``(B, T, D)`` in ``cfg.dtype``.

    Args:
      cfg: model config (static).
      params: base parameters (frozen; see the module docstring for the tree).
      ids: token ids ``(B, T)``.
      mask: ``(B, T)``, 1/True on real tokens. Padding may be on either side: positions are
        ``cumsum(mask) - 1`` so left padding behaves like HF given the same ``position_ids``.
      lora: optional adapter; it covers the top ``num_lora_layers(lora)`` layers.
      positions: ``(B, T)`` rotary positions instead of ``cumsum(mask) - 1``.
      segments: ``(B, T)`` ints for several continuations of one prefix packed in a row: a token
        of segment 0 is the shared prefix, seen by every later token; a token of segment ``k > 0``
        is seen only by later tokens of segment ``k``. With ``positions`` restarting at the prefix
        length for each segment, every continuation gets the hidden states it would get alone
        after the prefix (``mta_jax.eval.decoder_methods`` scores all candidates in one row so).
      bottom: ``(x, stop)`` from :func:`bottom_states` of the same ``ids`` / ``mask`` /
        ``positions`` / ``segments`` (``stop`` static): layers below ``stop`` are not run again.
        The LoRA must start at or above ``stop``.
    """
    cos, sin, allowed = _attention_inputs(cfg, ids, mask, positions, segments)
    if bottom is None:
        x, start = jnp.take(params["embed"], ids, axis=0).astype(jnp.dtype(cfg.dtype)), 0
    else:
        x, start = bottom
        if x.shape != (*ids.shape, cfg.hidden_size):
            raise ValueError(f"bottom states {x.shape} do not match ids {ids.shape} and hidden size {cfg.hidden_size}")
    for first, stop, lora_layers, scale in _stacks(cfg, params, lora):
        if stop <= start:
            continue
        if first < start:
            if lora_layers is not None:
                raise ValueError(f"the LoRA starts at layer {first}, below the shared bottom's {start} layers")
            first = start
        layers = _layer_slice(params[LAYERS], first, stop, cfg.num_layers)
        x = _scan_layers(cfg, layers, lora_layers, scale, x, cos, sin, allowed)
    norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype))
    return norm.apply({"params": params["final_norm"]}, x)


def init_cache(cfg: DecoderConfig, batch: int, length: int) -> dict[str, jax.Array]:
    """An empty key/value cache for :func:`decode`: ``{"k", "v"}``, each ``(L, batch, length, kv, e)``
    in ``cfg.dtype`` (keys are stored after the rotary embedding)."""
    if length > cfg.max_position:
        raise ValueError(f"cache length {length} exceeds max_position={cfg.max_position}")
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, jnp.dtype(cfg.dtype)), "v": jnp.zeros(shape, jnp.dtype(cfg.dtype))}


def decode(cfg: DecoderConfig, params: dict, ids: jax.Array, positions: jax.Array, cache: dict,
           index: jax.Array | int, key_mask: jax.Array,
           lora: LoRAParams | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs ``t`` new tokens against a key/value cache: a prefill (``t`` = prompt length) or a step.

    The tokens take cache slots ``[index, index + t)``; token ``i`` sees slot ``j`` when
    ``j <= index + i`` and ``key_mask[:, j]``, so slots not yet written are hidden by causality and
    the result equals :func:`hidden_states` over the whole sequence (tested to float32 rounding).

    Args:
      ids, positions: ``(B, t)`` token ids and their rotary positions.
      cache: from :func:`init_cache` (or a previous call), length ``S``.
      index: first slot to write (may be traced).
      key_mask: ``(B, S)``, False on padding slots.
      lora, cfg, params: as in :func:`hidden_states`.

    Returns:
      ``(h, cache)``: final-norm hidden states ``(B, t, D)`` of the new tokens, the updated cache.
    """
    b, t = ids.shape
    size = cache["k"].shape[2]
    if positions.shape != ids.shape or key_mask.shape != (b, size):
        raise ValueError(f"decode: ids {ids.shape}, positions {positions.shape} and key_mask "
                         f"{key_mask.shape} must be (B, t), (B, t) and (B, {size})")
    cos, sin = _rope(cfg, positions)
    slots = index + jnp.arange(t)
    allowed = (jnp.arange(size)[None, :] <= slots[:, None])[None] & key_mask.astype(bool)[:, None, :]
    x = jnp.take(params["embed"], ids, axis=0).astype(jnp.dtype(cfg.dtype))
    for first, stop, lora_layers, scale in _stacks(cfg, params, lora):
        layers = _layer_slice(params[LAYERS], first, stop, cfg.num_layers)
        part = _layer_slice(cache, first, stop, cfg.num_layers)
        x, part = _scan_layers(cfg, layers, lora_layers, scale, x, cos, sin, allowed, part, index)
        cache = jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, first, axis=0), cache, part)
    norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype))
    return norm.apply({"params": params["final_norm"]}, x), cache


def forward(cfg: DecoderConfig, params: dict, ids: jax.Array, mask: jax.Array,
            lora: LoRAParams | None = None) -> jax.Array:
    """Next-token logits ``(B, T, V)`` in fp32 (fp32 accumulation even when ``cfg.dtype`` is bf16).

    Arguments as in :func:`hidden_states`; tied models project with ``embed.T``.
    """
    return lm_logits(cfg, params, hidden_states(cfg, params, ids, mask, lora))


def lm_logits(cfg: DecoderConfig, params: dict, h: jax.Array) -> jax.Array:
    """Projects hidden states ``(..., D)`` to fp32 logits ``(..., V)`` (``embed.T`` when tied).

    Separate from :func:`forward` so a loss can project only the positions it needs: at a 150k
    vocabulary the full ``(B, T, V)`` logits dominate memory.
    """
    acc = jnp.promote_types(h.dtype, jnp.float32)
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", h, params["embed"].astype(h.dtype), preferred_element_type=acc)
    return jnp.einsum("...d,dv->...v", h, params["lm_head"].astype(h.dtype), preferred_element_type=acc)


def sequence_logprob(cfg: DecoderConfig, params: dict, ids: jax.Array, mask: jax.Array,
                     target_mask: jax.Array, lora: LoRAParams | None = None) -> jax.Array:
    """Sum of ``log p(ids[t] | ids[:t])`` over the target tokens of each sequence, shape ``(B,)``.

    Used for tool selection: the prompt lists the candidates and the target span is a tool name;
    ``-sequence_logprob`` is the training loss and scoring each candidate is constrained decoding.

    Args:
      target_mask: ``(B, T)``, True on target tokens. Token 0 has no prediction, so it must not be
        a target (checked when the mask is concrete).
      Other arguments as in :func:`hidden_states`.
    """
    if target_mask.shape != ids.shape:
        raise ValueError(f"target_mask {target_mask.shape} must match ids {ids.shape}")
    if not isinstance(target_mask, jax.core.Tracer) and np.asarray(target_mask)[:, 0].any():
        raise ValueError("target_mask marks token 0, which no logit predicts")
    logits = forward(cfg, params, ids, mask, lora)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target_mask[:, 1:].astype(bool), picked, 0.0), axis=-1)


def load_hf(model_dir: str | pathlib.Path, *, dtype: str = "float32",
            param_dtype: str = "float32") -> tuple[DecoderConfig, dict]:
    """Loads a HF Llama / Qwen2 checkpoint; see :func:`mta_jax.model.decoder_hf.load_hf`."""
    from mta_jax.model import decoder_hf  # deferred: decoder_hf imports this module

    return decoder_hf.load_hf(model_dir, dtype=dtype, param_dtype=param_dtype)
