"""The decoder configs' meta-step on real architecture shapes: compile time, step time, memory, FLOPs.

    python launch/bench_decoder.py --config configs/qwen2_mta.py --config.model.path=random:qwen2_0_5b \
        --config.data.doc_len=48 --profile

Builds exactly the step that ``launch/train.py`` runs (``loop.make_step_fn``: the episode batch from
the workload, then the jitted meta-step) on one device, with ``model.path`` a real checkpoint or a
``random:<preset>`` (``mta_jax.train.workloads.RANDOM_PRESETS``: the architecture's shapes, random
weights, MiniLM's tokenizer; its ToolLens names take up to 44 tokens, hence ``doc_len=48``). Prints
trace + compile time, the median of ``--rounds`` steps (fresh batches, one per round), XLA's
planned temp memory, the device's peak memory where the backend reports it, and XLA's FLOP count of
the step with the layer scan's body counted once per loop (``cost_analysis``: multiply by about
``num_layers`` for the real count; matmuls that XLA hands to a library, cuBLAS on GPU, are not
counted at all, so the number is meaningful on CPU). ``--profile`` traces one more step with ``jax.profiler`` and prints the device
kernels and XLA ops that took the most time (GPU/TPU; the CPU plane has no kernel lines).
"""
import collections
import glob
import pathlib
import sys
import tempfile
import time

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import _common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/qwen2_mta.py", "Experiment config file.",
                                          lock_config=True)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "timed steps after the first (compiling) one")
_PROFILE = flags.DEFINE_bool("profile", False, "trace one more step and print the top device ops")
_TOP = flags.DEFINE_integer("top", 15, "rows of each profile table")


def _top_device_ops(trace_dir: str, top: int) -> None:
    """Sums event durations per name on each device plane's kernel and XLA-op lines."""
    from jax._src.lib import _profile_data

    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        print("profile: no xplane.pb written")
        return
    data = _profile_data.ProfileData.from_file(files[-1])
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    if not planes:
        print(f"profile: no device plane (planes: {[p.name for p in data.planes]})")
    for plane in planes:
        for line in plane.lines:
            totals, counts = collections.Counter(), collections.Counter()
            for ev in line.events:
                totals[ev.name] += ev.duration_ns
                counts[ev.name] += 1
            if not totals:
                continue
            whole = sum(totals.values())
            print(f"profile {plane.name} / {line.name}: {whole / 1e6:.1f} ms in {sum(counts.values())} events")
            for name, ns in totals.most_common(top):
                print(f"  {ns / 1e6:9.2f} ms {100 * ns / whole:5.1f}% x{counts[name]:<5d} {name[:110]}")


def main(argv):
    _common.start(argv)
    import jax
    import numpy as np

    from mta_jax.data import records
    from mta_jax.train import loop
    from mta_jax.train import state as state_lib
    from mta_jax.train import workloads

    config = _CONFIG.value
    s = state_lib.settings_from_config(config)
    t0 = time.perf_counter()
    work = workloads.load_workload(s, records.resolve_data_dir(_common.DATA_DIR.value))
    base, tables = work.base, work.tables(work.base)
    state, opt = loop.initial_state(s, base)
    prep = time.perf_counter() - t0
    batches = [work.host_batch(i, s.tasks_per_step) for i in range(_ROUNDS.value + 2)]
    step = jax.jit(loop.make_step_fn(work, s, opt), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, base, tables, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, base, tables, batches[0])
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    times = []
    for b in batches[1:_ROUNDS.value + 1]:
        t0 = time.perf_counter()
        state, m = compiled(state, base, tables, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", float("nan")) / 2**30
    tokens = sum(int(np.prod(v.shape)) for k, v in batches[0].items() if k.endswith("_ids"))
    print(f"# {work.name} {config.model.dtype} tasks={s.tasks_per_step} tokens/step={tokens} "
          f"inner_steps={s.meta.inner.steps} algorithm={s.meta.name} task_chunk={s.meta.task_chunk} "
          f"remat={config.model.remat} jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"prep_s {prep:.1f} compile_s {compile_s:.1f} first_step_s {first_s:.1f} "
          f"step_s {np.median(times):.3f} (min {min(times):.3f}) xla_temp_GiB {temp:.1f} "
          f"device_peak_GiB {peak:.1f} xla_flops_body_once_T {cost.get('flops', 0) / 1e12:.1f} "
          f"loss {float(m['outer/loss']):.4f}")
    if _PROFILE.value:
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            state, m = compiled(state, base, tables, batches[-1])
            jax.block_until_ready(m)
            jax.profiler.stop_trace()
            _top_device_ops(d, _TOP.value)


if __name__ == "__main__":
    app.run(main)
