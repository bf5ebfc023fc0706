"""Periodic validation during training: top-1 accuracy of the current initialisation on val sets.

Every ``eval_every`` steps the training loop scores the current meta-parameters' test-time starting
point (``meta.initial_params``, zero-shot: no adaptation) on the val protocol files with the same
scorer as ``launch/eval.py``'s ``mta``/``ft`` methods, and logs ``val/<set>/accuracy`` into that
step's row of ``metrics.jsonl``. The frozen bottom layers of every val text are computed on the
first evaluation and reused by the later ones, so an evaluation after the first costs only the
LoRA-carrying top layers.

It runs on each process's own first device with a host copy of the frozen base (no collectives),
so under multi-host training every process computes the same numbers and process 0 logs them.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

import jax
import numpy as np

from mta_jax.data.render import tool_text
from mta_jax.eval import encoders
from mta_jax.eval import methods as methods_lib
from mta_jax.eval import metrics as metrics_lib
from mta_jax.eval import sets as sets_lib


@dataclasses.dataclass(frozen=True)
class ValSettings:
    """What to validate on and how to batch it (``config.eval_every`` and ``config.eval.*``).

    Attributes:
      every: evaluate every this many steps (and after the last step); 0 disables validation.
      sets: built-in eval-set names (e.g. ``metatool/val_sd``) or normalized-format folders.
      max_len, batch_size, batch_tokens: as for ``launch/eval.py`` (``config.eval``).
      options: the protocol seed files read and the items kept per set (``config.eval.protocol_seeds``
        and ``config.eval.max_items``, as for ``launch/eval.py``; default all five seeds, every item).
    """

    every: int = 0
    sets: tuple[str, ...] = ()
    max_len: int = 256
    batch_size: int = 64
    batch_tokens: int | None = methods_lib.DEFAULT_BATCH_TOKENS
    options: sets_lib.Options = sets_lib.Options()

    def check(self, log_every: int, model_kind: str) -> None:
        """Raises ValueError for a setting the loop cannot honour (naming the config field)."""
        if self.every < 0:
            raise ValueError(f"config.eval_every must be >= 0, got {self.every}")
        if not self.every:
            return
        if self.every % log_every:
            raise ValueError(f"config.eval_every={self.every} must be a multiple of config.log_every="
                             f"{log_every}: val accuracies are written into the log rows")
        if model_kind != "encoder":
            raise ValueError(f"periodic validation (config.eval_every > 0) is implemented for encoder "
                             f"models, not model.kind={model_kind!r}; set eval_every=0 and run "
                             f"launch/eval.py on the checkpoints")
        if not self.sets:
            raise ValueError("config.eval_every > 0 but config.eval.val_sets is empty")


class Validator:
    """Scores LoRA trees on the val sets; one instance per training run (it caches the bottom).

    Args:
      settings: the val sets and batching.
      cfg, base, tokenizer: the encoder, its frozen weights (any arrays; copied to the host) and
        its tokenizer.
      first_layer: the lowest LoRA layer (layers below it are frozen and cached).
      doc_style: the tool-doc rendering the run trains with.
      data_dir: benchmark data root.
    """

    def __init__(self, settings: ValSettings, cfg, base: Any, tokenizer, first_layer: int, doc_style: str,
                 data_dir: str | pathlib.Path | None):
        self.settings = settings
        opts = settings.options
        self.groups = sets_lib.build_sets(list(settings.sets), data_dir, opts.protocol_seeds, opts.max_items)
        device = jax.local_devices()[0]
        local_base = jax.device_put(jax.tree.map(np.asarray, base), device)
        self.bank = encoders.SharedBottomEncoder(
            cfg, local_base, tokenizer, first_layer=first_layer, max_len=settings.max_len,
            batch_size=settings.batch_size, batch_tokens=settings.batch_tokens)
        self.render = functools.partial(tool_text, style=doc_style)
        self.device = device

    def __call__(self, lora) -> dict[str, float]:
        """``{"val/<set>/accuracy": fraction, ..., "val_eval_sec": seconds}`` for one LoRA tree."""
        t0 = time.perf_counter()
        lora = jax.device_put(jax.tree.map(np.asarray, lora), self.device)
        scorer = methods_lib.embedding_scorer(self.bank.embed_fn(lora), render=self.render)
        try:
            results = metrics_lib.evaluate({"val": scorer}, self.groups)
        finally:
            self.bank.drop_embeddings(lora)
        out = {f"val/{name}/accuracy": float(entry["val"]["accuracy"]) for name, entry in results.items()}
        out["val_eval_sec"] = time.perf_counter() - t0
        return out

    def due(self, step: int, last_step: int) -> bool:
        """Whether to validate after ``step`` (every ``every`` steps and after the last one)."""
        return bool(self.settings.every) and (step % self.settings.every == 0 or step == last_step)


def val_settings(every: int, eval_config) -> ValSettings:
    """Builds :class:`ValSettings` from ``config.eval_every`` and the ``config.eval`` section."""
    sets = tuple(eval_config.get("val_sets", ()) or ())
    batch_tokens = eval_config.get("batch_tokens", methods_lib.DEFAULT_BATCH_TOKENS) or None
    return ValSettings(every=int(every), sets=sets, max_len=int(eval_config.max_len),
                       batch_size=int(eval_config.batch_size), batch_tokens=batch_tokens,
                       options=sets_lib.Options.from_config(eval_config))
