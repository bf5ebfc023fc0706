"""Evaluation of trained runs: restores LoRA from workdirs, builds every method, writes the reports.

Lives in ``train/`` because it needs both the checkpoints (train) and the methods (eval); ``eval/``
itself never imports ``train/``.
"""
from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Callable, Sequence

import jax
import ml_collections

from mta_jax.data import records
from mta_jax.data.render import tool_text
from mta_jax.eval import encoders
from mta_jax.eval import methods as methods_lib
from mta_jax.eval import metrics as metrics_lib
from mta_jax.eval import report
from mta_jax.eval import sets as sets_lib
from mta_jax.train import loop
from mta_jax.train import workloads

TRAINED = ("mta", "ft", "mta_adapt")


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, methods: Sequence[str],
        sets: Sequence[str], data_dir: str | None = None, ft_workdir: pathlib.Path | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Evaluates ``methods`` on ``sets`` and writes ``workdir/eval/results.{json,md,png}``.

    Args:
      config: the experiment config (model, eval settings).
      workdir: the run to evaluate (``mta``, ``mta_adapt`` and, without ``ft_workdir``, ``ft``).
      methods: method names (``random``, ``bm25``, ``zero_shot``, ``mta``, ``ft``, ``mta_adapt``).
      sets: built-in eval set names and/or normalized-format folders.
      data_dir: benchmark data root (default ``$MTA_DATA_DIR``).
      ft_workdir: the FT baseline's workdir.
      log: progress lines.

    Returns:
      The results dict (also written to disk).
    """
    unknown = sorted(set(methods) - set(methods_lib.METHODS) - set(TRAINED))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from "
                         f"{sorted(set(methods_lib.METHODS) | set(TRAINED))}")
    t0 = time.perf_counter()
    groups = sets_lib.build_sets(list(sets), records.resolve_data_dir(data_dir))
    log(f"built {len(groups)} eval sets in {time.perf_counter() - t0:.1f}s")

    name, cfg, base, tok = workloads.load_backbone(config.model.path, config.model.dtype, False)
    trained = {}
    for m in methods:
        if m in TRAINED:
            src = ft_workdir if (m == "ft" and ft_workdir is not None) else workdir
            trained[m] = loop.restore_trained(src, base, name)
    # Share the frozen bottom across methods: the lowest LoRA layer over all trained runs.
    first = min([s.lora.first_layer for s, _, _ in trained.values()] or [cfg.num_layers - 1])
    bank = encoders.SharedBottomEncoder(cfg, base, tok, first_layer=first,
                                        max_len=config.eval.max_len, batch_size=config.eval.batch_size)
    scorers = {}
    for m in methods:
        if m == "zero_shot":
            scorers[m] = methods_lib.embedding_scorer(bank.embed_fn(None))
        elif m in ("mta", "ft"):
            settings, _, lora = trained[m]
            render = functools.partial(tool_text, style=settings.data.doc_style)  # as trained
            scorers[m] = methods_lib.embedding_scorer(bank.embed_fn(lora), render=render)
        elif m == "mta_adapt":
            from mta_jax.eval import adapt as adapt_lib  # only this method needs the meta-learner
            s, meta_params, _ = trained[m]
            scorers[m] = adapt_lib.adapt_scorer(bank, s, meta_params, shots=config.eval.adapt_shots)
        else:
            scorers[m] = methods_lib.METHODS[m](methods_lib.MethodContext(config=config, workdir=workdir))
    results = metrics_lib.evaluate(scorers, groups, log=log)
    out = pathlib.Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report.write_results(out / "results.json", results)
    (out / "results.md").write_text(report.markdown_table(results, list(methods)), encoding="utf-8")
    report.bar_chart(results, out / "results.png", list(methods))
    (out / "run.json").write_text(json.dumps({
        "methods": list(methods), "sets": list(sets), "ft_workdir": str(ft_workdir) if ft_workdir else None,
        "base": name, "devices": str(jax.devices()), "seconds": round(time.perf_counter() - t0, 1)},
        indent=2), encoding="utf-8")
    return results
