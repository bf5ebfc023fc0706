"""FT baseline for ``smollm2_mta``: pooled LoRA fine-tuning of SmolLM2-135M-Instruct on the same
episodes and budget, no inner loop (commands and numbers: ``configs/smollm2_mta.py``)."""
from mta_jax import config_files


def get_config(arg=None):
    return config_files.ft_baseline(config_files.sibling(__file__, "smollm2_mta", arg))
