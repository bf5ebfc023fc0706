"""FT baseline for ``minilm_mta_2shot_l45``: the same episodes, LoRA placement, temperature and budget,
no inner loop.

Command and runtime: see configs/minilm_mta_2shot_l45.py (FT training 2.3-2.5 min on 2 CPU cores,
Zen 4 host). Measured (unseen test tools, top-1 %, training seeds 0-3): ft MetaTool SD 88.8 / CD
91.3, ToolLens SD 60.8 / CD 79.7; ft_adapt 89.0 / 91.5 / 61.3 / 79.9.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta_2shot_l45", arg)
    return config_files.ft_baseline(c, ("ft", "ft_adapt"))
