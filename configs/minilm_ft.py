"""FT baseline: pooled LoRA fine-tuning of all-MiniLM-L6-v2 on the same episodes and budget, no inner loop.

Command:
  python launch/train.py --config configs/minilm_ft.py --workdir runs/minilm_ft
  python launch/eval.py  --config configs/minilm_ft.py --workdir runs/minilm_ft --methods=ft
Expected runtime (2 CPU cores, measured): training 2.4 min (100 steps, ~1.3 s/step); 1.4 min on a 2-core
AMD Zen 5 host (session 22).
Expected metric (ft, top-1 %, unseen test tools, protocol seeds 0-4, training seeds 0-7): MetaTool SD
88.6 / CD 91.0, ToolLens SD 61.3 / CD 80.0; full table in BUILD_NOTES.md "Results". Docs rendered as in
minilm_mta (`compact_doc`, 64 tokens).

Identical to minilm_mta (same data stream, steps, LoRA, optimiser) except `meta.algorithm = "pooled"`:
the loss on support ∪ query items of each episode, so the comparison isolates the inner loop.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta", arg)
    return config_files.ft_baseline(c)
