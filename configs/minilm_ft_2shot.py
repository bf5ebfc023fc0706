"""FT baseline for ``minilm_mta_2shot``: the same episodes, LoRA placement, temperature and budget, no
inner loop.

Command and runtime: see configs/minilm_mta_2shot.py (FT training 2.3 min on 2 CPU cores, Zen 5 host).
Measured (unseen test tools, top-1 %, training seeds 0-3): ft MetaTool SD 90.1 / CD 93.1, ToolLens SD
59.9 / CD 79.7; ft_adapt 90.3 / 93.2 / 60.6 / 79.9.
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta_2shot", arg)
    return config_files.ft_baseline(c, ("ft", "ft_adapt"))
