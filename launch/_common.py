"""Shared flag plumbing for the entry points: the compilation cache and the data directory flag."""
import os
import pathlib

from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]

DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Benchmark data folder (default: $MTA_DATA_DIR; see the README).")


def setup_jax() -> None:
    """Persistent compilation cache: second-order meta-steps compile once per machine, not per run."""
    import jax  # imported here so XLA_FLAGS set by the caller take effect first

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_logs() -> None:
    """Orbax and XLA's backend probing log every detail at INFO; keep our own INFO lines readable."""
    import logging as std_logging

    for name in ("orbax", "absl", "jax._src.xla_bridge"):
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
