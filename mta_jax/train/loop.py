"""The training loop: the one place that wires data, backbone, meta-learner, sharding and checkpoints.

Cost model (why the loop looks like this; BUILD_NOTES.md has the measurements): LoRA sits on the top
``L - first_layer`` layers only, so the frozen bottom layers are run once for every tool doc before
training (a device-resident table of hidden states) and, for the few dozen queries of a step, once per
step outside of any gradient. Each episode's ``N`` docs are embedded once per inner step and shared by
all of its items.
"""
from __future__ import annotations

import json
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mta_jax import meta
from mta_jax.data import records
from mta_jax.data import render
from mta_jax.data import tokenize
from mta_jax.meta import losses
from mta_jax.model import encoder
from mta_jax.model import lora as lora_lib
from mta_jax.tasks import batching
from mta_jax.tasks import episodes
from mta_jax.train import checkpoint
from mta_jax.train import metrics as metrics_lib
from mta_jax.train import sharding
from mta_jax.train import state as state_lib

STREAM_INIT = 0  # named PRNG streams split from the root key (levanter style)


RANDOM_TINY = "random-tiny"


def load_backbone(model_path: str, dtype: str, remat: bool):
    """Returns ``(name, cfg, base, tokenizer)`` for a local HF BERT folder or the packaged MiniLM.

    ``model_path == "random-tiny"`` builds a 2-layer, width-32 BERT with random weights (seed 0) and
    MiniLM's tokenizer: the test-suite model (gemma's ``DummyGemma`` idea).
    """
    if model_path == RANDOM_TINY:
        model_dir = encoder.default_model_dir()
        tok = tokenize.Tokenizer.from_dir(model_dir)
        cfg = encoder.EncoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                                    intermediate_size=64, dtype=dtype, remat=remat)
        return RANDOM_TINY, cfg, encoder.init_params(cfg, jax.random.key(0)), tok
    model_dir = pathlib.Path(model_path) if model_path else encoder.default_model_dir()
    cfg, base = encoder.load_hf(model_dir)
    cfg = cfg.__class__(**{**cfg.__dict__, "dtype": dtype, "remat": remat})
    return str(model_dir), cfg, base, tokenize.Tokenizer.from_dir(model_dir)


def bottom_states(cfg: encoder.EncoderConfig, base: dict, ids: np.ndarray, mask: np.ndarray,
                  stop: int, batch_size: int = 256) -> np.ndarray:
    """Hidden states after the frozen layers ``[0, stop)`` for every row, computed in fixed-size chunks."""
    fn = jax.jit(lambda b, i, m: encoder.run_layers(cfg, b, encoder.embed(cfg, b, i), m, stop=stop))
    n = ids.shape[0]
    out = np.zeros((n, ids.shape[1], cfg.hidden_size), np.float32)
    for s in range(0, n, batch_size):
        chunk_ids, chunk_mask = ids[s:s + batch_size], mask[s:s + batch_size]
        pad = batch_size - chunk_ids.shape[0]  # pad the last chunk: one compiled shape
        if pad:
            chunk_ids = np.pad(chunk_ids, ((0, pad), (0, 0)))
            chunk_mask = np.pad(chunk_mask, ((0, pad), (0, 0)))
        out[s:s + batch_size] = np.asarray(fn(base, chunk_ids, chunk_mask))[:batch_size - pad]
    return out


class TrainData:
    """Train pool, episode sampler and the token tables every step gathers from."""

    def __init__(self, s: state_lib.Settings, data_dir: pathlib.Path, tok: tokenize.Tokenizer):
        self.pool = episodes.load_train_pool(data_dir, s.data.datasets)
        self.sampler = episodes.EpisodeSampler(self.pool, s.episode, seed=s.seed)
        docs = [render.tool_text(t, style=s.data.doc_style) for t in self.pool.tools]
        self.doc_ids, self.doc_mask = tok.encode(docs, s.data.doc_len)
        self.query_ids, self.query_mask = tok.encode(list(self.pool.item_queries), s.data.query_len)


def make_step_fn(cfg: encoder.EncoderConfig, s: state_lib.Settings, outer_opt):
    """The per-step function: gathers the episode tensors on device, then one meta-step.

    Returns:
      ``step(state, base, tables, batch) -> (state, metrics)``, pure and jit-able.
    """
    start = s.lora.first_layer
    loss_fn = losses.BiEncoderLoss(cfg, start=start, scale=s.loss_scale)
    meta_step = meta.make_meta_step(loss_fn, s.meta, outer_opt, has_aux=True, jit=False)

    def task_sets(base, tables, batch):
        tool_h = tables["doc_h"][batch["tools"]]            # [T, N, Td, D]
        tool_mask = tables["doc_mask"][batch["tools"]]
        out = []
        for part in ("support", "query"):
            items = batch[f"{part}_items"]                    # [T, S]
            ids, mask = tables["query_ids"][items], tables["query_mask"][items]
            t, n, length = ids.shape
            # Frozen bottom for this step's queries: no gradient flows into the base.
            h = encoder.run_layers(cfg, base, encoder.embed(cfg, base, ids.reshape(t * n, length)),
                                   mask.reshape(t * n, length), stop=start)
            h = jax.lax.stop_gradient(h).reshape(t, n, length, -1)
            out.append({"tool_h": tool_h, "tool_mask": tool_mask, "query_h": h, "query_mask": mask,
                        "cands": batch[f"{part}_cands"], "label": batch[f"{part}_label"]})
        return out

    def step(state: state_lib.TrainState, base, tables, batch):
        supports, queries = task_sets(base, tables, batch)
        new_meta, metrics = meta_step(state.meta, base, supports, queries)
        return state_lib.TrainState(new_meta, state.key), metrics

    return step


def make_outer_optimizer(s: state_lib.Settings) -> optax.GradientTransformation:
    """Adam with linear warm-up and cosine decay, after global-norm clipping."""
    warmup = max(min(s.outer_warmup, s.steps - 1), 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, s.outer_lr, warmup, max(s.steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(s.outer_clip), optax.adam(sched))


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
    """
    s = state_lib.settings_from_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    t0 = time.perf_counter()

    name, cfg, base, tok = load_backbone(s.model_path, s.model_dtype, s.remat_layers)
    data = TrainData(s, records.resolve_data_dir(data_dir), tok)
    mesh = sharding.make_mesh(s.mesh)
    sharding.check_tasks_divisible(s.tasks_per_step, mesh)
    logging.info("mesh %s over %d %s devices", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

    base = jax.device_put(base, sharding.base_sharding(mesh, base))
    rep = sharding.replicated(mesh)
    doc_h = bottom_states(cfg, base, data.doc_ids, data.doc_mask, s.lora.first_layer)
    tables = jax.device_put({"doc_h": doc_h, "doc_mask": data.doc_mask,
                             "query_ids": data.query_ids, "query_mask": data.query_mask}, rep)
    prep_sec = time.perf_counter() - t0

    root = jax.random.key(s.seed)
    lora = lora_lib.init_lora(jax.random.fold_in(root, STREAM_INIT), base, s.lora)
    outer_opt = make_outer_optimizer(s)
    fresh = state_lib.TrainState(meta.init_state(lora, s.meta, outer_opt), root)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", s.keep_checkpoints, run_identity(name, base, config))
    state, origin = checkpoint.restore_or_init(ckpt, fresh, s.init_from or None)
    logging.info("state: %s", origin)
    state = jax.device_put(state, rep)

    example = data.sampler.batch(0, s.tasks_per_step)
    batch_sh = sharding.task_sharded(mesh, example)
    step_fn = jax.jit(make_step_fn(cfg, s, outer_opt),
                      in_shardings=(rep, sharding.base_sharding(mesh, base), rep, batch_sh),
                      out_shardings=(rep, rep), donate_argnums=(0,))

    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir)
    progress = metrics_lib.Progress(s.steps, start)
    stopper = _Stop()
    batches = batching.prefetch(
        (jax.device_put(data.sampler.batch(i, s.tasks_per_step), batch_sh) for i in range(start, s.steps)),
        s.prefetch)
    pending, t_log, step = [], time.perf_counter(), start
    try:
        for step in range(start, s.steps):
            state, m = step_fn(state, base, tables, next(batches))
            pending.append(m)
            done = step + 1
            if done % s.log_every == 0 or done == s.steps:
                fetched = jax.device_get(pending)  # one host sync per log interval
                mean = {k: float(np.mean([p[k] for p in fetched])) for k in fetched[0]}
                now = time.perf_counter()
                mean["step_time_sec"] = (now - t_log) / len(fetched)
                if step + 1 - len(fetched) == start:
                    mean["prep_sec"] = prep_sec
                t_log, pending = now, []
                writer.write(done, mean)
                progress.update(done, f"loss {mean.get('outer/loss', float('nan')):.4f}")
            stop = stopper.requested
            if done % s.checkpoint_every == 0 or done == s.steps or stop:
                ckpt.save(done, state, force=True)
            if stop:
                break
    finally:
        progress.close()
        stopper.restore()
        ckpt.close()
    return state


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
                                   {"base_name": base_name, "base_fingerprint": checkpoint.base_fingerprint(base)})
    try:
        state, _ = ckpt.restore(fresh)
    finally:
        ckpt.close()
    return s, state.meta.params, meta.initial_params(state.meta.params, s.meta)
