"""MetaToolAgent on a Llama decoder (e.g. Llama-3.x): second-order MAML over LoRA (r=8, q/v, all layers), bf16.

Needs a GPU/TPU (an 8B model: ~16 GB of bf16 weights plus activations; shard with mesh.fsdp on a
slice) and a local HF checkpoint folder (config.json, safetensors, tokenizer.json):
  python launch/train.py --config configs/llama_mta.py:/ckpt/Llama-3.2-1B-Instruct --workdir runs/llama_mta
  python launch/eval.py  --config configs/llama_mta.py:/ckpt/Llama-3.2-1B-Instruct --workdir runs/llama_mta \
      --methods=random,bm25,zero_shot,mta,mta@gen
Expected runtime and metric: not measured yet (no accelerator run has been made with this config).

Same recipe as ``configs/qwen2_mta.py`` (see its docstring for the field meanings and eval methods).
"""
import importlib.util
import pathlib


def get_config(arg=None):
    path = pathlib.Path(__file__).with_name("qwen2_mta.py")
    spec = importlib.util.spec_from_file_location("qwen2_mta", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.tasks_per_step = 4    # larger models: fewer tasks per step
    c.outer.lr = 1e-4
    return c
