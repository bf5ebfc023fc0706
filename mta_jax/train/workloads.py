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

import dataclasses
import json
import pathlib

import jax
import numpy as np

from mta_jax.data import render
from mta_jax.data import tokenize
from mta_jax.meta import losses
from mta_jax.model import decoder
from mta_jax.model import encoder
from mta_jax.tasks import episodes
from mta_jax.tasks import prompts as prompts_lib
from mta_jax.train import state as state_lib

RANDOM_TINY = "random-tiny"
RANDOM_TINY_DECODER = "random-tiny-decoder"
# ``model.path = "random:<preset>"``: a real architecture's shapes with random weights, for speed and
# memory checks of the decoder configs where no checkpoint can be downloaded (launch/bench_decoder.py).
RANDOM_PRESET = "random:"
RANDOM_PRESETS = {"qwen2_0_5b": decoder.DecoderConfig.qwen2_0_5b, "llama3_8b": decoder.DecoderConfig.llama3_8b}


def random_decoder_config(model_path: str, dtype: str, remat: bool | str) -> decoder.DecoderConfig:
    """The :class:`~mta_jax.model.decoder.DecoderConfig` of ``"random:<preset>"``, stored and computed
    in ``dtype``.

    Raises:
      ValueError: the preset is not in :data:`RANDOM_PRESETS`.
    """
    name = model_path[len(RANDOM_PRESET):]
    if name not in RANDOM_PRESETS:
        raise ValueError(f"config.model.path={model_path!r}: unknown random preset {name!r}; "
                         f"known: {', '.join(RANDOM_PRESET + k for k in sorted(RANDOM_PRESETS))}")
    return dataclasses.replace(RANDOM_PRESETS[name](), dtype=dtype, param_dtype=dtype, remat=remat)


def load_backbone(model_path: str, dtype: str, remat: bool | str):
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
        self.doc_queries = s.episode.support_source == "docs"
        if self.doc_queries:  # support queries are the tools' own docs (support_items = tool ids)
            self.docq_ids, self.docq_mask = self.tok.encode(
                [render.pseudo_query(t) for t in self.pool.tools], s.data.query_len)
        self.loss_fn = losses.BiEncoderLoss(self.cfg, start=s.lora.first_layer, scale=s.loss_scale)
        # Per-dataset inverse temperatures, looked up per tool (see task_sets).
        self.tool_scale = None
        if s.loss_dataset_scale:
            per_dataset = np.array([s.dataset_loss_scale(d) for d in self.pool.datasets], np.float32)
            self.tool_scale = per_dataset[self.pool.tool_dataset]

    def host_batch(self, step: int, num_tasks: int) -> dict[str, np.ndarray]:
        """The index batch of ``step`` (pure in (seed, step); runs in the prefetch thread)."""
        return self.sampler.batch(step, num_tasks)

    def tables(self, base) -> dict[str, np.ndarray]:
        """Device-resident lookup tables: cached doc hidden states and tokenised queries."""
        doc_h = bottom_states(self.cfg, base, self.doc_ids, self.doc_mask, self.s.lora.first_layer)
        tables = {"doc_h": doc_h, "doc_mask": self.doc_mask,
                  "query_ids": self.query_ids, "query_mask": self.query_mask}
        if self.doc_queries:
            tables.update(docq_ids=self.docq_ids, docq_mask=self.docq_mask)
        if self.tool_scale is not None:
            tables["tool_scale"] = self.tool_scale
        return tables

    def task_sets(self, base, tables, batch):
        """Turns an index batch into the loss's support and query batches (inside jit)."""
        cfg, start = self.cfg, self.s.lora.first_layer
        tool_h = tables["doc_h"][batch["tools"]]            # [T, N, Td, D]
        tool_mask = tables["doc_mask"][batch["tools"]]
        # one dataset per episode: its first tool's scale is the task's (support and query alike)
        scale = None if self.tool_scale is None else tables["tool_scale"][batch["tools"][:, 0]]  # [T]
        out = []
        for part in ("support", "query"):
            items = batch[f"{part}_items"]                    # [T, S]
            src = "docq" if part == "support" and self.doc_queries else "query"
            ids, mask = tables[f"{src}_ids"][items], tables[f"{src}_mask"][items]
            t, n, length = ids.shape
            # Frozen bottom for this step's queries: no gradient flows into the base.
            h = encoder.run_layers(cfg, base, encoder.embed(cfg, base, ids.reshape(t * n, length)),
                                   mask.reshape(t * n, length), stop=start)
            h = jax.lax.stop_gradient(h).reshape(t, n, length, -1)
            sets = {"tool_h": tool_h, "tool_mask": tool_mask, "query_h": h, "query_mask": mask,
                    "cands": batch[f"{part}_cands"], "label": batch[f"{part}_label"]}
            if scale is not None:
                sets["scale"] = scale
            out.append(sets)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class DecoderBackbone:
    """A loaded decoder: ``name`` (identity recorded in checkpoints), config, frozen weights, tokenizer, eos id."""

    name: str
    cfg: decoder.DecoderConfig
    base: dict
    tok: tokenize.Tokenizer
    eos_id: int


def _eos_id(model_dir: pathlib.Path, tok: tokenize.Tokenizer) -> int:
    """``eos_token_id`` of ``config.json`` (the first, if a list), else ``tokenizer_config.json``'s eos token."""
    conf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    eos = conf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None:
        return int(eos)
    tc = model_dir / "tokenizer_config.json"
    token = json.loads(tc.read_text(encoding="utf-8")).get("eos_token") if tc.is_file() else None
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        raise ValueError(f"{model_dir}: no eos_token_id in config.json and no eos_token in tokenizer_config.json")
    return tok.token_to_id(token)


def load_decoder_backbone(model_path: str, dtype: str, remat: bool | str) -> DecoderBackbone:
    """Loads a local HF Llama / Qwen2 folder, or the random test model.

    ``model_path == "random-tiny-decoder"`` builds a 2-layer, width-32 Qwen2-style decoder (GQA 4:2,
    qkv bias, tied embeddings) with random weights (seed 0) and MiniLM's tokenizer (eos = ``[SEP]``);
    ``"random:<preset>"`` (:data:`RANDOM_PRESETS`) a real architecture's shapes, random weights
    (seed 0) initialised on the device in ``dtype``, and the same tokenizer: for speed and memory only.
    Real checkpoints are stored in ``dtype`` (bf16 configs keep an 8B model at 16 GB).

    Raises:
      ValueError: ``model_path`` is empty (decoders have no packaged default).
    """
    if model_path == RANDOM_TINY_DECODER:
        model_dir = encoder.default_model_dir()
        tok = tokenize.Tokenizer.from_dir(model_dir)
        cfg = decoder.DecoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=8, intermediate_size=64, qkv_bias=True,
                                    tie_embeddings=True, max_position=512, dtype=dtype, remat=remat,
                                    arch="qwen2")
        return DecoderBackbone(RANDOM_TINY_DECODER, cfg, decoder.init_params(cfg, jax.random.key(0)), tok,
                               tok.token_to_id("[SEP]"))
    if model_path.startswith(RANDOM_PRESET):
        cfg = random_decoder_config(model_path, dtype, remat)
        tok = tokenize.Tokenizer.from_dir(encoder.default_model_dir())
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{model_path}: MiniLM's tokenizer has {tok.vocab_size} ids, more than the "
                             f"preset's vocab_size={cfg.vocab_size}")
        base = jax.jit(lambda k: decoder.init_params(cfg, k))(jax.random.key(0))
        return DecoderBackbone(model_path, cfg, base, tok, tok.token_to_id("[SEP]"))
    if not model_path:
        raise ValueError("config.model.path is empty: decoder configs need a local HF Llama/Qwen2 folder "
                         "(or 'random-tiny-decoder', or 'random:<preset>' for speed checks)")
    model_dir = pathlib.Path(model_path)
    cfg, base = decoder.load_hf(model_dir, dtype=dtype, param_dtype=dtype)
    tok = tokenize.Tokenizer.from_dir(model_dir)
    return DecoderBackbone(str(model_dir), dataclasses.replace(cfg, remat=remat), base, tok, _eos_id(model_dir, tok))


class DecoderWorkload:
    """Decoder tool selection as in MetaToolAgent: the prompt lists the item's candidate tools and the
    query, the target is the gold tool's name (+ eos); loss = cross-entropy on the target span.

    Sizes come from the shared config fields: ``data.query_len`` is the sequence length ``L``
    (prompt + target tokens) and ``data.doc_len`` the most target tokens (label + eos); every train
    tool's label is checked against it up front, so no batch can fail mid-run. ``loss.scale`` and
    ``data.doc_style`` are encoder-only and ignored. Prompts are tokenised in the prefetch thread;
    there are no device tables (the whole decoder runs per step; LoRA usually covers every layer).
    """

    def __init__(self, s: state_lib.Settings, data_dir: pathlib.Path):
        self.s = s
        bb = load_decoder_backbone(s.model_path, s.model_dtype, s.remat_layers)
        self.name, self.cfg, self.base, self.tok, self.eos_id = bb.name, bb.cfg, bb.base, bb.tok, bb.eos_id
        if s.data.query_len > self.cfg.max_position:
            raise ValueError(f"config.data.query_len={s.data.query_len} exceeds the model's "
                             f"max_position={self.cfg.max_position}")
        self.pool = episodes.load_train_pool(data_dir, s.data.datasets)
        self.sampler = episodes.EpisodeSampler(self.pool, s.episode, seed=s.seed)
        self.encoder = prompts_lib.PromptEncoder(self.tok, s.data.query_len, s.data.doc_len, self.eos_id)
        train = np.flatnonzero(self.pool.tool_is_train)
        labels = [" " + prompts_lib.tool_label(self.pool.tools[i], self.pool.datasets[self.pool.tool_dataset[i]])
                  for i in train]
        self.encoder.target_ids(labels)  # raises, naming the label, if one exceeds doc_len
        self.loss_fn = losses.DecoderTargetLoss(self.cfg, max_target=s.data.doc_len)

    def host_batch(self, step: int, num_tasks: int) -> dict[str, np.ndarray]:
        """Index batch of ``step`` plus its token arrays ``{support,query}_{ids,mask,target_mask} [T, S, L]``.

        Also ``{part}_truncated [T]``: how many of the task's prompts lost tokens to fit ``L``.
        """
        batch = self.sampler.batch(step, num_tasks)
        for part in ("support", "query"):
            t, n = batch[f"{part}_items"].shape
            enc = self.encoder.pairs(*prompts_lib.episode_texts(self.pool, batch, part))
            length = self.s.data.query_len
            batch[f"{part}_ids"] = enc.ids.reshape(t, n, length)
            batch[f"{part}_mask"] = enc.mask.reshape(t, n, length)
            batch[f"{part}_target_mask"] = enc.target_mask.reshape(t, n, length)
            batch[f"{part}_truncated"] = enc.truncated.reshape(t, n).sum(1).astype(np.int32)
        return batch

    def tables(self, base) -> dict[str, np.ndarray]:
        """No device tables: prompts differ per item, so nothing is shared across steps."""
        return {}

    def task_sets(self, base, tables, batch):
        """Selects the support and query token arrays (inside jit)."""
        return tuple({"ids": batch[f"{p}_ids"], "mask": batch[f"{p}_mask"],
                      "target_mask": batch[f"{p}_target_mask"]} for p in ("support", "query"))


# Explicit registry (no string dispatch through getattr): config.model.kind -> workload class.
WORKLOADS = {"encoder": EncoderWorkload, "decoder": DecoderWorkload}


def load_workload(s: state_lib.Settings, data_dir: pathlib.Path):
    if s.model_kind not in WORKLOADS:
        raise ValueError(f"config.model.kind={s.model_kind!r} unknown; choose one of {sorted(WORKLOADS)}")
    return WORKLOADS[s.model_kind](s, data_dir)


