"""FT baseline at 20x the default budget: ``minilm_ft`` with ``minilm_mta_long``'s steps and episodes.

Command: see configs/minilm_mta_long.py (same runtime notes; FT steps are ~25% cheaper on a GPU and
about half the cost on the CPU).
"""
from mta_jax import config_files


def get_config(arg=None):
    c = config_files.sibling(__file__, "minilm_mta_long", arg)
    return config_files.ft_baseline(c)
