"""Shared flag plumbing for the entry points: the compilation cache and the data directory flag."""
import os
import pathlib

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]

DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Benchmark data folder (default: $MTA_DATA_DIR; see the README).")


def start(argv) -> None:
    """What every entry point's ``main`` does first: reject stray arguments, the cache, quiet logs."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_jax()
    quiet_logs()


def setup_jax() -> None:
    """Persistent compilation cache: second-order meta-steps compile once per machine, not per run."""
    import jax  # imported here so XLA_FLAGS set by the caller take effect first

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_logs() -> None:
    """Orbax logs every checkpoint detail at INFO through absl; keep our own INFO lines readable."""
    import logging as std_logging

    from absl import logging as absl_logging

    class _DropLibraryInfo(std_logging.Filter):
        def filter(self, record):
            noisy = "/orbax/" in record.pathname or "xla_bridge" in record.pathname
            return record.levelno >= std_logging.WARNING or not noisy

    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())
