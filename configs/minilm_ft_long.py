"""FT baseline at 20x the default budget: ``minilm_ft`` with ``minilm_mta_long``'s steps and episodes.

Command: see configs/minilm_mta_long.py (same runtime notes; an FT step costs about half an MTA step
on the CPU and about the same on the GPU when the two run side by side).
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta_long", arg)
    return config_files.ft_baseline(c)
