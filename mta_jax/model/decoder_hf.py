"""Imports Hugging Face Llama / Qwen2 checkpoints (``config.json`` + safetensors) into the decoder's parameter tree."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from mta_jax.model import hf_io
from mta_jax.model.decoder import ARCHS, DecoderConfig, RopeScaling
from mta_jax.model.lora import LAYERS


def config_from_hf(hf_config: dict) -> DecoderConfig:
    """Builds a config from a HF ``config.json`` dict (``model_type`` llama or qwen2).

    Raises:
      ValueError: unsupported model type, activation, RoPE variant, sliding window or biases.
    """
    model_type = hf_config.get("model_type")
    if model_type not in ARCHS:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported; "
                         f"supported: {sorted(ARCHS)}")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf_config]
    if missing:
        raise ValueError(f"config.json ({model_type}): missing fields {missing}")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    theta, scaling = _rope_from_hf(hf_config)
    if model_type == "qwen2":
        layer_types = hf_config.get("layer_types") or []
        if hf_config.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ValueError("config.json: Qwen2 sliding-window attention is not supported "
                             f"(use_sliding_window={hf_config.get('use_sliding_window')}, "
                             f"layer_types={sorted(set(layer_types))})")
        qkv_bias = True  # HF Qwen2Attention hard-codes bias=True on q/k/v, none on o
    else:
        for field in ("attention_bias", "mlp_bias"):
            if hf_config.get(field):
                raise ValueError(f"config.json: Llama {field}=True is not supported")
        qkv_bias = False
    return DecoderConfig(
        vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=hf_config["intermediate_size"], rope_theta=float(theta),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)), qkv_bias=qkv_bias,
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        max_position=int(hf_config.get("max_position_embeddings", 4096)), arch=model_type,
        rope_scaling=scaling)


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers-5 ``rope_parameters`` or older ``rope_theta``/``rope_scaling``."""
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        try:
            return theta, RopeScaling(
                float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"]),
                int(rp.get("original_max_position_embeddings", hf.get("max_position_embeddings"))))
        except (KeyError, TypeError) as e:
            raise ValueError(f"config.json: llama3 rope parameters incomplete ({e}): {rp}") from e
    raise ValueError(f"config.json: rope_type={kind!r} is not supported (only 'default' and 'llama3')")


def _hf_layer_tensors(cfg: DecoderConfig) -> list[tuple[str, str, bool, tuple[int, ...]]]:
    """(our path in a layer, HF name after ``layers.{i}.``, transpose Linear (out,in), our shape)."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    rows = [("attn/q/kernel", "self_attn.q_proj.weight", True, (D, q)),
            ("attn/k/kernel", "self_attn.k_proj.weight", True, (D, kv)),
            ("attn/v/kernel", "self_attn.v_proj.weight", True, (D, kv)),
            ("attn/o/kernel", "self_attn.o_proj.weight", True, (q, D)),
            ("attn_norm/scale", "input_layernorm.weight", False, (D,)),
            ("mlp/gate/kernel", "mlp.gate_proj.weight", True, (D, F)),
            ("mlp/up/kernel", "mlp.up_proj.weight", True, (D, F)),
            ("mlp/down/kernel", "mlp.down_proj.weight", True, (F, D)),
            ("mlp_norm/scale", "post_attention_layernorm.weight", False, (D,))]
    if cfg.qkv_bias:
        rows += [(f"attn/{n}/bias", f"self_attn.{n}_proj.bias", False, (o,)) for n, o in (("q", q), ("k", kv), ("v", kv))]
    return rows


def load_hf(model_dir: str | pathlib.Path, *, dtype: str = "float32",
            param_dtype: str = "float32") -> tuple[DecoderConfig, dict]:
    """Loads a HF Llama / Qwen2 checkpoint (``config.json`` + single or sharded safetensors).

    Linear weights ``(out, in)`` are transposed, per-layer tensors stacked, bf16 cast to
    ``param_dtype``; the ``model.`` name prefix is optional and ``rotary_emb.inv_freq`` ignored.

    Args:
      model_dir: HF model folder.
      dtype: compute dtype recorded in the returned config.
      param_dtype: storage dtype of the returned weights.

    Returns:
      ``(cfg, params)``; ``cfg.tie_embeddings`` is set when the checkpoint stores no ``lm_head``.

    Raises:
      hf_io.CheckpointError: a missing, misshapen or unused tensor (named), checked before any
        weight is converted. ValueError: an unsupported config.
    """
    cfg = dataclasses.replace(config_from_hf(hf_io.read_config(model_dir)),
                              dtype=dtype, param_dtype=param_dtype)
    reader = hf_io.TensorReader(hf_io.read_tensors(model_dir), str(model_dir), prefixes=("model.", ""))
    D = cfg.hidden_size
    flat = {"embed": reader.take("embed_tokens.weight", (cfg.vocab_size, D)),
            "final_norm/scale": reader.take("norm.weight", (D,))}
    for ours, hf_name, transpose, shape in _hf_layer_tensors(cfg):
        flat[f"{LAYERS}/{ours}"] = np.stack([reader.take(f"layers.{i}.{hf_name}", shape, transpose=transpose)
                                             for i in range(cfg.num_layers)])
    if reader.has("lm_head.weight"):
        head = reader.take("lm_head.weight", (D, cfg.vocab_size), transpose=True)
        if not cfg.tie_embeddings:
            flat["lm_head"] = head
        elif not np.array_equal(head.T, flat["embed"]):
            raise hf_io.CheckpointError(f"{model_dir}: tie_word_embeddings=true but lm_head.weight "
                                        "differs from embed_tokens.weight")
    else:
        cfg = dataclasses.replace(cfg, tie_embeddings=True)  # HF ties when the head is not stored
    unused = [n for n in reader.unused() if not n.endswith("rotary_emb.inv_freq")]
    if unused:
        raise hf_io.CheckpointError(f"{model_dir}: {len(unused)} tensors not used by the "
                                    f"{cfg.arch} decoder: {unused[:8]}")
    return cfg, hf_io.nest(flat, param_dtype)
