"""Shared flag plumbing for the entry points: the compilation cache, the data directory, multi-host."""
import importlib.metadata
import os
import pathlib

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]

DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Benchmark data folder (default: $MTA_DATA_DIR; see the README).")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() before anything else. Alone it "
    "auto-detects the cluster (Cloud TPU, SLURM, ...); elsewhere give the three flags below.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (implies --distributed).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def start(argv) -> None:
    """What every entry point's ``main`` does first: reject stray arguments, the cache, quiet logs."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_jax()
    init_distributed()
    quiet_logs()


# XLA flags the entry points add unless XLA_FLAGS already sets them; each backend ignores the others'.
# CPU: jaxlib 0.10.2's CPU backend turns LayerNorm/softmax reductions into YNNPACK "reduce" fusions
# that run far below memory speed; without them the second-order attention is ~20% and the 5+5-item
# meta-step 5-7% faster (BUILD_NOTES.md, Speed, session 6).
# GPU: matmuls through cuBLAS, not XLA's Triton GEMM fusions, with no autotuning. Measured on an H100
# (BUILD_NOTES.md, "On a lent GPU", session 14), qwen2_mta's meta-step on Qwen2-0.5B shapes: 0.75 s
# with these flags, 7.06 s with Triton GEMMs untuned (autotune level 0: 88% of the time in
# gemm_fusion kernels), and XLA's default (autotuned Triton) ran out of memory at the first step
# (allocator fragmentation after autotuning; the step needs 33 GiB of the 80). Compilation: 8 s vs 17 s.
# XLA aborts on a flag it does not know and some of these are experimental, so they are added only
# for the jaxlib versions they were checked with (0.10.2, pinned here; 0.11.2, on the lent GPU image).
DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce", "--xla_gpu_enable_triton_gemm=false",
                     "--xla_gpu_autotune_level=0")
FLAGS_CHECKED_WITH_JAXLIB = ("0.10.", "0.11.")


def with_default_xla_flags(xla_flags: str) -> str:
    """``xla_flags`` plus each :data:`DEFAULT_XLA_FLAGS` entry whose flag name it does not set."""
    flags_ = xla_flags.split()
    names = {f.split("=", 1)[0] for f in flags_}
    return " ".join(flags_ + [f for f in DEFAULT_XLA_FLAGS if f.split("=", 1)[0] not in names])


def apply_default_xla_flags() -> None:
    """Adds :data:`DEFAULT_XLA_FLAGS` to ``$XLA_FLAGS`` (with a checked jaxlib). Must run before JAX
    creates its backend, which is when XLA reads the variable."""
    if importlib.metadata.version("jaxlib").startswith(FLAGS_CHECKED_WITH_JAXLIB):
        os.environ["XLA_FLAGS"] = with_default_xla_flags(os.environ.get("XLA_FLAGS", ""))


def setup_jax() -> None:
    """Default XLA flags, and the persistent compilation cache (second-order meta-steps compile once
    per machine, not per run)."""
    apply_default_xla_flags()
    import jax  # imported here so XLA_FLAGS set by the caller take effect first

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def init_distributed() -> None:
    """``jax.distributed.initialize`` when asked to (every process runs the same command).

    On CPU the processes exchange collectives through gloo. Every process builds the same
    episodes and places only its own shard (see ``mta_jax.train.sharding.put``); process 0 writes
    the metrics and the progress bar; all of them take part in checkpointing.
    """
    if not (DISTRIBUTED.value or COORDINATOR.value):
        if NUM_PROCESSES.value is not None or PROCESS_ID.value is not None:
            raise app.UsageError("--num_processes/--process_id need --coordinator_address (or --distributed)")
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices
    jax.distributed.initialize(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                               process_id=PROCESS_ID.value)


def quiet_logs() -> None:
    """Orbax logs every checkpoint detail at INFO through absl; keep our own INFO lines readable."""
    import logging as std_logging

    from absl import logging as absl_logging

    class _DropLibraryInfo(std_logging.Filter):
        def filter(self, record):
            noisy = "/orbax/" in record.pathname or "xla_bridge" in record.pathname
            return record.levelno >= std_logging.WARNING or not noisy

    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())
