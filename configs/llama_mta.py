"""MetaToolAgent on a Llama decoder (e.g. Llama-3.x): second-order MAML over LoRA (r=8, q/v, all layers), bf16.

Needs a GPU/TPU (an 8B model: ~16 GB of bf16 weights plus activations; shard with mesh.fsdp on a
slice) and a local HF checkpoint folder (config.json, safetensors, tokenizer.json):
  python launch/train.py --config configs/llama_mta.py:/ckpt/Llama-3.2-1B-Instruct --workdir runs/llama_mta
  python launch/eval.py  --config configs/llama_mta.py:/ckpt/Llama-3.2-1B-Instruct --workdir runs/llama_mta \
      --methods=random,bm25,zero_shot,mta,mta@gen
Expected runtime and metric: not measured with a real checkpoint (no metric exists). On one H100
with random weights of Llama-3-8B's shapes (``--config.model.path=random:llama3_8b``, session 15):
2.43 s/step (about 41 min for 1000 steps), compiled in 7 s, 31.5 GiB device peak (15 GiB of it
the bf16 weights). ``meta.task_chunk=1`` (one task at a time) is therefore the
default: all 4 tasks vmapped asked for a 60.7 GiB buffer and ran out of memory on the 80 GiB H100,
and 2 at a time took the same 2.40 s/step at 46 GiB (``launch/bench_decoder.py`` measures it).

Same recipe as ``configs/qwen2_mta.py`` (see its docstring for the field meanings and eval methods).
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "qwen2_mta", arg)
    c.tasks_per_step = 4    # larger models: fewer tasks per step
    c.outer.lr = 1e-4
    c.meta.task_chunk = 1   # H100 80 GiB: 4 vmapped tasks run out of memory; 1 is as fast as 2 (docstring)
    return c
