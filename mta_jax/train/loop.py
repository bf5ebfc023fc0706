"""The training loop: the one place that wires workload, meta-learner, sharding and checkpoints."""
from __future__ import annotations

import json
import pathlib
import signal
import time

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
import optax
from absl import logging

from mta_jax import meta
from mta_jax.data import records
from mta_jax.model import lora as lora_lib
from mta_jax.tasks import batching
from mta_jax.train import checkpoint
from mta_jax.train import metrics as metrics_lib
from mta_jax.train import sharding
from mta_jax.train import state as state_lib
from mta_jax.train import validation
from mta_jax.train import workloads

STREAM_INIT = 0  # named PRNG streams split from the root key (levanter style)


def make_step_fn(workload, s: state_lib.Settings, outer_opt):
    """The per-step function: the workload builds the task batches on device, then one meta-step.

    Returns:
      ``step(state, base, tables, batch) -> (state, metrics)``, pure and jit-able.
    """
    meta_step = meta.make_meta_step(workload.loss_fn, s.meta, outer_opt, has_aux=True, jit=False)

    def step(state: state_lib.TrainState, base, tables, batch):
        supports, queries = workload.task_sets(base, tables, batch)
        new_meta, metrics = meta_step(state.meta, base, supports, queries)
        return state_lib.TrainState(new_meta, state.key), metrics

    return step


def make_outer_optimizer(s: state_lib.Settings) -> optax.GradientTransformation:
    """Adam with linear warm-up and cosine decay, after global-norm clipping."""
    warmup = max(min(s.outer_warmup, s.steps - 1), 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, s.outer_lr, warmup, max(s.steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(s.outer_clip), optax.adam(sched))


def initial_state(s: state_lib.Settings, base) -> tuple[state_lib.TrainState, optax.GradientTransformation]:
    """A fresh run's state (LoRA from the root key's init stream, step 0) and its outer optimiser."""
    root = jax.random.key(s.seed)
    lora = lora_lib.init_lora(jax.random.fold_in(root, STREAM_INIT), base, s.lora)
    outer_opt = make_outer_optimizer(s)
    return state_lib.TrainState(meta.init_state(lora, s.meta, outer_opt), root), outer_opt


def run_identity(name: str, base: dict, config: ml_collections.ConfigDict) -> dict:
    return {"base_name": name, "base_fingerprint": checkpoint.base_fingerprint(base),
            "config": json.loads(config.to_json_best_effort())}


class _Stop:
    """Turns SIGTERM into a flag the loop polls, so a pre-empted run checkpoints before exiting."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing and stopping after this step")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          data_dir: str | None = None) -> state_lib.TrainState:
    """Meta-trains (or pooled fine-tunes) LoRA on the train tools; returns the final state.

    Args:
      config: an experiment config from ``configs/``.
      workdir: output folder: ``checkpoints/``, ``metrics.jsonl``, ``config.json``.
      data_dir: benchmark data folder (default: ``$MTA_DATA_DIR``).

    Under multi-host training (``jax.distributed.initialize`` called first, e.g. by
    ``launch/train.py --distributed``) every process runs this with the same arguments; process 0
    writes ``config.json``, ``metrics.jsonl`` and the progress bar.
    """
    s = state_lib.settings_from_config(config)
    s.val.check(s.log_every, s.model_kind)
    main_process = jax.process_index() == 0
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    data_dir = records.resolve_data_dir(data_dir)
    work = workloads.load_workload(s, data_dir)
    name, host_base = work.name, work.base
    mesh = sharding.make_mesh(s.mesh)
    sharding.check_tasks_divisible(s.tasks_per_step, mesh)
    logging.info("mesh %s over %d %s devices in %d process(es)", dict(mesh.shape), mesh.size,
                 jax.devices()[0].platform, jax.process_count())

    base = sharding.put(host_base, sharding.base_sharding(mesh, host_base))
    rep = sharding.replicated(mesh)
    tables = sharding.put(work.tables(host_base), rep)
    validator = None
    if s.val.every:
        validator = validation.Validator(s.val, work.cfg, host_base, work.tok, s.lora.first_layer,
                                         s.data.doc_style, data_dir)
    prep_sec = time.perf_counter() - t0

    fresh, outer_opt = initial_state(s, base)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", s.keep_checkpoints, run_identity(name, host_base, config))
    state, origin = checkpoint.restore_or_init(ckpt, fresh, s.init_from or None)
    logging.info("state: %s", origin)
    if main_process:  # only now: a refused resume leaves the workdir's config.json describing its run
        text, path = config.to_json_best_effort(indent=2), workdir / "config.json"
        if not path.is_file() or path.read_text() != text:  # unchanged: keep its time (sweep reuse)
            path.write_text(text)
    state = sharding.put(state, rep)

    example = work.host_batch(0, s.tasks_per_step)
    batch_sh = sharding.task_sharded(mesh, example)
    step_fn = jax.jit(make_step_fn(work, s, outer_opt),
                      in_shardings=(rep, sharding.base_sharding(mesh, base), rep, batch_sh),
                      out_shardings=(rep, rep), donate_argnums=(0,))

    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir) if main_process else None
    if writer is not None and (dropped := writer.resume_at(start)):
        logging.info("metrics.jsonl: dropped %d row(s) written after the step-%d checkpoint", dropped, start)
    progress = metrics_lib.Progress(s.steps, start) if main_process else None
    stopper = _Stop()
    batches = batching.prefetch(
        (sharding.put(work.host_batch(i, s.tasks_per_step), batch_sh) for i in range(start, s.steps)),
        s.prefetch)
    pending, t_log, step = [], time.perf_counter(), start
    try:
        for step in range(start, s.steps):
            state, m = step_fn(state, base, tables, next(batches))
            if pending:
                # At most one step in flight: the device runs this step while the host waits for the
                # previous one, so a SIGTERM is acted on within a step, not after a log interval of
                # already-dispatched steps (a waited-on handle, no transfer).
                jax.block_until_ready(pending[-1])
            pending.append(m)
            done = step + 1
            if done % s.log_every == 0 or done == s.steps:
                fetched = jax.device_get(pending)  # one host sync per log interval
                mean = {k: float(np.mean([p[k] for p in fetched])) for k in fetched[0]}
                now = time.perf_counter()
                mean["step_time_sec"] = (now - t_log) / len(fetched)
                if step + 1 - len(fetched) == start:
                    mean["prep_sec"] = prep_sec
                mean.update(_device_memory())
                if validator is not None and validator.due(done, s.steps):
                    val = validator(meta.initial_params(jax.device_get(state.meta.params), s.meta))
                    mean.update(val)
                    logging.info("step %d val: %s (%.1fs)", done, ", ".join(
                        f"{k.split('/')[1]}/{k.split('/')[2]} {100 * v:.1f}" for k, v in val.items()
                        if k.endswith("/accuracy")), val["val_eval_sec"])
                    now = time.perf_counter()  # the next step_time_sec excludes validation
                t_log, pending = now, []
                if main_process:
                    writer.write(done, mean)
                    progress.update(done, f"loss {mean.get('outer/loss', float('nan')):.4f}")
            stop = stopper.requested
            if jax.process_count() > 1:  # a pre-emption notice to any process stops them all
                stop = bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))
            if done % s.checkpoint_every == 0 or done == s.steps or stop:
                ckpt.save(done, state, force=True)
            if stop:
                break
    finally:
        if progress is not None:
            progress.close()
        try:
            ckpt.close()  # waits for the last (asynchronous) save ...
        finally:
            stopper.restore()  # ... while a second SIGTERM is still only a flag
    return state


def finished(state: state_lib.TrainState, config: ml_collections.ConfigDict) -> bool:
    """Whether :func:`train` ran to ``config.steps`` (False after a SIGTERM stop)."""
    return int(jax.device_get(state.step)) >= int(config.steps)


def _device_memory() -> dict[str, float]:
    """``{"device_peak_MB": ...}``: the most memory this process's first local device has held so far,
    where the backend reports it (GPU, TPU; XLA's CPU client reports nothing, so {} there)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return {}
    return {"device_peak_MB": stats["peak_bytes_in_use"] / 2**20}


def restore_trained(workdir: str | pathlib.Path, base: dict, base_name: str):
    """Loads a finished (or interrupted) run for evaluation.

    Rebuilds the run's config from ``<workdir>/config.json`` and restores its latest checkpoint
    into a freshly initialised state of the same structure.

    Returns:
      ``(settings, meta_params, lora)`` where ``lora`` is what the method starts from at test time
      (``meta.initial_params``: e.g. Meta-SGD's ``init`` part).

    Raises:
      FileNotFoundError: the workdir has no config.json or no checkpoint.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a training workdir (run launch/train.py first)")
    config = ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))
    s = state_lib.settings_from_config(config)
    lora = lora_lib.init_lora(jax.random.key(0), base, s.lora)
    fresh = state_lib.TrainState(meta.init_state(lora, s.meta, make_outer_optimizer(s)), jax.random.key(0))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", s.keep_checkpoints,
                                   {"base_name": base_name, "base_fingerprint": checkpoint.base_fingerprint(base)},
                                   create=False)
    try:
        state, _ = ckpt.restore(fresh)
    finally:
        ckpt.close()
    return s, state.meta.params, meta.initial_params(state.meta.params, s.meta)
