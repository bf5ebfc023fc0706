"""Workloads: what a backbone needs to meta-train on tool selection (data tables, batches, loss).

A workload hands the generic loop (``train/loop.py``) four things: ``host_batch(step, T)`` (NumPy,
pure in (seed, step), produced in the prefetch thread), ``tables(base)`` (device-resident lookups
computed once), ``task_sets(base, tables, batch)`` (inside jit: index batch -> support and query
batches) and ``loss_fn(params, base, batch) -> (loss, aux)``.

Cost model of the encoder workload (BUILD_NOTES.md has the measurements): LoRA sits on the top
``L - first_layer`` layers only, so the frozen bottom layers run once for every tool doc before
training and, for the few dozen queries of a step, once per step outside of any gradient. Each
episode's ``N`` docs are embedded once per inner step and shared by all of its items.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np

from mta_jax.data import render
from mta_jax.data import tokenize
from mta_jax.meta import losses
from mta_jax.model import encoder
from mta_jax.tasks import episodes
from mta_jax.train import state as state_lib

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


class EncoderWorkload:
    """Bi-encoder tool selection: episodes of tool docs + queries, cosine scores, CE over candidates.

    Tool docs are rendered and tokenised once and their frozen bottom (layers below the lowest
    LoRA layer) is computed once before training; a step gathers its episodes' rows on device.
    """

    def __init__(self, s: state_lib.Settings, data_dir: pathlib.Path):
        self.s = s
        self.name, self.cfg, self.base, self.tok = load_backbone(s.model_path, s.model_dtype, s.remat_layers)
        self.pool = episodes.load_train_pool(data_dir, s.data.datasets)
        self.sampler = episodes.EpisodeSampler(self.pool, s.episode, seed=s.seed)
        docs = [render.tool_text(t, style=s.data.doc_style) for t in self.pool.tools]
        self.doc_ids, self.doc_mask = self.tok.encode(docs, s.data.doc_len)
        self.query_ids, self.query_mask = self.tok.encode(list(self.pool.item_queries), s.data.query_len)
        self.loss_fn = losses.BiEncoderLoss(self.cfg, start=s.lora.first_layer, scale=s.loss_scale)

    def host_batch(self, step: int, num_tasks: int) -> dict[str, np.ndarray]:
        """The index batch of ``step`` (pure in (seed, step); runs in the prefetch thread)."""
        return self.sampler.batch(step, num_tasks)

    def tables(self, base) -> dict[str, np.ndarray]:
        """Device-resident lookup tables: cached doc hidden states and tokenised queries."""
        doc_h = bottom_states(self.cfg, base, self.doc_ids, self.doc_mask, self.s.lora.first_layer)
        return {"doc_h": doc_h, "doc_mask": self.doc_mask,
                "query_ids": self.query_ids, "query_mask": self.query_mask}

    def task_sets(self, base, tables, batch):
        """Turns an index batch into the loss's support and query batches (inside jit)."""
        cfg, start = self.cfg, self.s.lora.first_layer
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
        return tuple(out)


# Explicit registry (no string dispatch through getattr): config.model.kind -> workload class.
WORKLOADS = {"encoder": EncoderWorkload}


def load_workload(s: state_lib.Settings, data_dir: pathlib.Path):
    if s.model_kind not in WORKLOADS:
        raise ValueError(f"config.model.kind={s.model_kind!r} unknown; choose one of {sorted(WORKLOADS)}")
    return WORKLOADS[s.model_kind](s, data_dir)


