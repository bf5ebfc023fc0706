"""Benchmarks host-side episode sampling: episodes/s of ``batch(step, 4)`` for N = 8..16, S = Q = 5, C = 5.

    python launch/bench_episodes.py --data_dir=/work/shared/data --steps=300

Measured on 2 shared CPU cores: ~2.3k episodes/s idle, 0.6-1k under load (N=8..16), i.e. about 1 ms per
episode: negligible next to a meta step.
"""
import time

from absl import app, flags

from mta_jax.data import records
from mta_jax.tasks import episodes

_DATA_DIR = flags.DEFINE_string("data_dir", None, "data root (default: $MTA_DATA_DIR or the fetch cache)")
_STEPS = flags.DEFINE_integer("steps", 300, "batches per configuration")
_TASKS = flags.DEFINE_integer("tasks", 4, "tasks per batch")
_DATASETS = flags.DEFINE_list("datasets", ["metatool", "toollens"], "train pools")


def main(argv):
    del argv
    data_dir = records.resolve_data_dir(_DATA_DIR.value)
    t0 = time.perf_counter()
    pool = episodes.load_train_pool(data_dir, _DATASETS.value)
    print(f"pool: {len(pool.tools)} tools, {len(pool.item_ids)} train items, loaded in "
          f"{time.perf_counter() - t0:.2f}s")
    for n in (8, 12, 16):
        for regime in ("sd", "cd", "mixed"):
            sampler = episodes.EpisodeSampler(pool, episodes.EpisodeConfig(n, 5, 5, 5, regime), seed=0)
            sampler.batch(0, _TASKS.value)  # warm-up
            t0 = time.perf_counter()
            for step in range(_STEPS.value):
                sampler.batch(step, _TASKS.value)
            dt = time.perf_counter() - t0
            print(f"N={n:2d} regime={regime:5s}: {_STEPS.value * _TASKS.value / dt:8.0f} episodes/s "
                  f"({1e3 * dt / _STEPS.value:.2f} ms per batch of {_TASKS.value})")
    sampler = episodes.EpisodeSampler(pool, episodes.EpisodeConfig(8, 5, 5, 5, "cd"), seed=0)
    t0 = time.perf_counter()
    for step in range(_STEPS.value):
        sampler.pooled_batch(step, 32)
    print(f"pooled_batch(32): {_STEPS.value * 32 / (time.perf_counter() - t0):8.0f} items/s")


if __name__ == "__main__":
    app.run(main)
