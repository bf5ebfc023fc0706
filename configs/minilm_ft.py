"""FT baseline: pooled LoRA fine-tuning of all-MiniLM-L6-v2 on the same episodes and budget, no inner loop.

Command:
  python launch/train.py --config configs/minilm_ft.py --workdir runs/minilm_ft
  python launch/eval.py  --config configs/minilm_ft.py --workdir runs/minilm_ft --methods=ft
Expected runtime (2 CPU cores, measured): training 2 min (100 steps, ~1.2 s/step).
Expected metric (ft, top-1 %, unseen test tools): MetaTool SD 88.4 ± 0.2 / CD 91.1 ± 0.1,
ToolLens SD 52.3 ± 0.5 / CD 74.0 ± 0.1; full table in BUILD_NOTES.md "Results".
Richer docs: --config.data.doc_style=full_doc --config.data.doc_len=128 (ToolLens tools rendered with
their parameters and return schema) gives ft MetaTool 88.8 / 91.6, ToolLens 59.3 / 79.1 on test (4 training
seeds) at ~2.2x the training time; BUILD_NOTES.md "The full ToolLens doc".

Identical to minilm_mta (same data stream, steps, LoRA, optimiser) except `meta.algorithm = "pooled"`:
the loss on support ∪ query items of each episode, so the comparison isolates the inner loop.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta", arg)
    c.meta.algorithm = "pooled"
    c.meta.inner_steps = 0
    c.meta.support_weight = 0.0  # pooled has no inner loop: all items are already in its loss
    c.eval.methods = ("ft",)
    return c
