"""FT baseline for ``minilm_mta_deep``: the same data, LoRA placement and budget, no inner loop.

Command and runtime: see configs/minilm_mta_deep.py (FT training ~8 min on 2 CPU cores).
Measured (training seed 0, unseen test tools, top-1 %): ft MetaTool SD 89.8 / CD 93.0, ToolLens SD
60.6 / CD 79.8; ft_adapt 90.6 / 93.3 / 62.4 / 80.6.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta_deep", arg)
    return config_files.ft_baseline(c, ("ft", "ft_adapt"))
