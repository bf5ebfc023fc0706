"""FT baseline for ``minilm_mta_deep``: the same data, LoRA placement and budget, no inner loop.

Command and runtime: see configs/minilm_mta_deep.py (FT training ~8 min on 2 CPU cores).
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta_deep", arg)
    c.meta.algorithm = "pooled"
    c.meta.inner_steps = 0
    c.meta.support_weight = 0.0
    c.eval.methods = ("ft", "ft_adapt")
    return c
