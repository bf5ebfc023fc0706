"""Writes a LoRA tree as a PEFT adapter folder that ``peft.PeftModel.from_pretrained`` loads onto the HF model.

Layout written (PEFT's saved format, adapter name stripped)::

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, layers_to_transform, ...
    adapter_model.safetensors   {prefix}.{i}.{module}.lora_A.weight (r, in), .lora_B.weight (out, r)

Our LoRA leaf ``a (L', in, r)`` / ``b (L', r, out)`` maps to PEFT's ``lora_A = a[j].T`` and
``lora_B = b[j].T`` for layer ``i = first_layer + j``; PEFT's scaling ``lora_alpha / r`` equals our
``LoRAConfig.scale``. No torch: tensors are written with ``safetensors.numpy``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import jax
import numpy as np
from safetensors.numpy import save_file

from mta_jax.model.lora import LAYERS, LoRAConfig, LoRAParams, path_str

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class ArchMap:
    """How one HF architecture names its per-layer Linear modules (as PEFT sees them).

    Attributes:
      layers_path: module path of the layer list in the HF model PEFT wraps (e.g. ``model.layers``
        in ``Qwen2ForCausalLM``, ``encoder.layer`` in ``BertModel``).
      modules: our module path inside a layer -> HF module path inside a layer. Lists *every*
        Linear of a layer, so a PEFT suffix pattern can be checked for unintended matches.
      task_type: PEFT ``task_type`` (picks the ``PeftModel`` subclass on load).
    """

    layers_path: str
    modules: dict
    task_type: str | None

    @property
    def layers_pattern(self) -> str:
        return self.layers_path.rsplit(".", 1)[-1]


_LLAMA = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
          "attn/o": "self_attn.o_proj", "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
          "mlp/down": "mlp.down_proj"}
ARCHS = {
    "llama": ArchMap("model.layers", _LLAMA, "CAUSAL_LM"),
    "qwen2": ArchMap("model.layers", _LLAMA, "CAUSAL_LM"),
    # A bare BertModel (what sentence-transformers wraps); no task head, so a plain PeftModel.
    "bert": ArchMap("encoder.layer", {"attn/q": "attention.self.query", "attn/k": "attention.self.key",
                                      "attn/v": "attention.self.value", "attn/o": "attention.output.dense",
                                      "mlp/up": "intermediate.dense", "mlp/down": "output.dense"}, None),
}


def _lora_modules(lora: LoRAParams) -> dict[str, dict]:
    """Our in-layer module path (``attn/q``) -> ``{"a", "b"}`` arrays, for the stacked part of the tree."""
    if set(lora.tree) != {LAYERS}:
        raise ValueError(f"PEFT export supports LoRA on stacked layers only; the tree has top-level keys "
                         f"{sorted(lora.tree)}")
    out: dict[str, dict] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(lora.tree[LAYERS])[0]:
        module, leaf = path_str(path).rsplit("/", 1)
        if leaf not in ("a", "b"):
            raise ValueError(f"LoRA leaf layers/{module}/{leaf} is neither 'a' nor 'b'")
        out.setdefault(module, {})[leaf] = np.asarray(x)
    for module, ab in out.items():
        if set(ab) != {"a", "b"}:
            raise ValueError(f"LoRA module layers/{module} has leaves {sorted(ab)}, expected a and b")
    return out


def _target_modules(arch: ArchMap, hf_names: list[str], layers: list[int]) -> dict:
    """PEFT targeting: suffix list + ``layers_to_transform`` when unambiguous, else one exact regex.

    A suffix like BERT's ``output.dense`` (the MLP down projection) also matches
    ``attention.output.dense``; if that module is not an adapter target, a suffix list would give it
    a stray adapter, so we fall back to a regex naming layers and modules exactly.
    """
    others = set(arch.modules.values()) - set(hf_names)
    if not any(o.endswith("." + t) for t in hf_names for o in others):
        return {"target_modules": sorted(hf_names), "layers_to_transform": layers,
                "layers_pattern": arch.layers_pattern}
    regex = (rf"{re.escape(arch.layers_path)}\.({'|'.join(map(str, layers))})\."
             rf"({'|'.join(re.escape(n) for n in sorted(hf_names))})")
    return {"target_modules": regex, "layers_to_transform": None, "layers_pattern": None}


def export_peft(out_dir: str | pathlib.Path, lora: LoRAParams, lora_cfg: LoRAConfig, *, arch: str,
                num_layers: int, base_model_name_or_path: str) -> pathlib.Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``.

    Args:
      out_dir: folder to create or overwrite the two files in.
      lora: the adapter (layers stacked; the top ``L'`` layers of a ``num_layers``-layer model).
      lora_cfg: its config (rank, alpha, first_layer); checked against ``lora``.
      arch: ``"llama"``, ``"qwen2"`` (``*ForCausalLM``) or ``"bert"`` (``BertModel``).
      num_layers: layers of the base model.
      base_model_name_or_path: recorded in the config (hub id or local folder of the base model).

    Returns:
      ``out_dir`` as a path.

    Raises:
      ValueError: unsupported ``arch``, a LoRA module with no PEFT name for ``arch``, or a tree that
        disagrees with ``lora_cfg`` / ``num_layers`` (rank, scale, layer count).
    """
    if arch not in ARCHS:
        raise ValueError(f"PEFT export: unsupported arch {arch!r}; supported: {sorted(ARCHS)}")
    amap = ARCHS[arch]
    modules = _lora_modules(lora)
    unmapped = sorted(set(modules) - set(amap.modules))
    if unmapped:
        raise ValueError(f"PEFT export ({arch}): no HF module name for LoRA targets "
                         f"{['layers/' + m for m in unmapped]}; mapped: {sorted(amap.modules)}")
    if not math.isclose(lora.scale, lora_cfg.scale, rel_tol=1e-6):
        raise ValueError(f"LoRA tree scale {lora.scale} != lora_cfg alpha/rank = {lora_cfg.scale}")
    n_lora = {ab["a"].shape[0] for ab in modules.values()}
    if len(n_lora) != 1 or num_layers - next(iter(n_lora)) != lora_cfg.first_layer:
        raise ValueError(f"LoRA covers {sorted(n_lora)} top layers of {num_layers}, but "
                         f"lora_cfg.first_layer={lora_cfg.first_layer}")
    first = lora_cfg.first_layer
    tensors = {}
    for module, ab in sorted(modules.items()):
        a, b = ab["a"], ab["b"]
        if a.ndim != 3 or b.ndim != 3 or a.shape[2] != lora_cfg.rank or b.shape[1] != lora_cfg.rank:
            raise ValueError(f"LoRA layers/{module}: a {a.shape}, b {b.shape}; expected (L', in, "
                             f"{lora_cfg.rank}) and (L', {lora_cfg.rank}, out)")
        for j in range(a.shape[0]):
            key = f"base_model.model.{amap.layers_path}.{first + j}.{amap.modules[module]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[j].T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[j].T)
    config = {
        "peft_type": "LORA", "task_type": amap.task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None,
        **_target_modules(amap, [amap.modules[m] for m in modules], list(range(first, num_layers))),
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out
