"""Evaluation of trained runs: restores LoRA from workdirs, builds every method, writes the reports.

Lives in ``train/`` because it needs both the checkpoints (train) and the methods (eval); ``eval/``
itself never imports ``train/``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from mta_jax.data import records
from mta_jax.data.render import tool_text
from mta_jax.eval import adapt as adapt_lib
from mta_jax.eval import decoder_methods
from mta_jax.eval import encoders
from mta_jax.eval import methods as methods_lib
from mta_jax.eval import metrics as metrics_lib
from mta_jax.eval import predictions as predictions_lib
from mta_jax.eval import report
from mta_jax.eval import sets as sets_lib
from mta_jax.train import loop
from mta_jax.train import workloads

TRAINED = ("mta", "ft", "mta_adapt", "ft_adapt", "mta_tta", "ft_tta", "mta_docs", "ft_docs")
# Methods that adapt to the unseen tools before predicting, by what they adapt on: labelled queries
# (k-shot), unlabelled queries (entropy inner loss) or the tools' docs (see ``eval/adapt.py``).
ADAPTED_SUPPORT = {"mta_adapt": "labelled", "ft_adapt": "labelled", "mta_tta": "unlabelled",
                   "ft_tta": "unlabelled", "mta_docs": "docs", "ft_docs": "docs"}


def lora_mix(name: str) -> tuple[str, float | None]:
    """``"mta:0.5"`` -> ``("mta", 0.5)``; a name without ``:`` -> ``(name, None)``.

    ``mta:A`` / ``ft:A`` score with the trained LoRA update scaled by ``A``: the weights
    ``W0 + A * dW`` interpolate between the pretrained backbone (``A = 0``, ``zero_shot``) and the
    trained run (``A = 1``), the weight-space ensemble of WiSE-FT (Wortsman et al., 2022), which
    trades in-distribution gains against forgetting. Choose ``A`` on val sets, not test sets.

    Raises:
      ValueError: ``:`` after another method, or ``A`` not a finite number >= 0 (naming the method).
    """
    base, sep, arg = name.partition(":")
    if not sep:
        return name, None
    if base not in ("mta", "ft"):
        raise ValueError(f"method {name!r}: only mta and ft take a :ALPHA LoRA interpolation suffix")
    try:
        alpha = float(arg)
    except ValueError:
        raise ValueError(f"method {name!r}: {arg!r} after ':' is not a number") from None
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"method {name!r}: the interpolation weight must be a finite number >= 0")
    return base, alpha


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, methods: Sequence[str],
        sets: Sequence[str], data_dir: str | None = None, ft_workdir: pathlib.Path | None = None,
        log: Callable[[str], None] = print, out_dir: pathlib.Path | None = None,
        predictions: bool = False) -> dict:
    """Evaluates ``methods`` on ``sets`` and writes ``results.{json,md,png}`` to ``out_dir``.

    Args:
      config: the experiment config (model, eval settings).
      workdir: the run to evaluate (``mta``, ``mta_adapt`` and, without ``ft_workdir``, ``ft``).
      methods: method names (``random``, ``bm25``, ``zero_shot``, ``mta``, ``ft``, ``mta_adapt``,
        ``ft_adapt``, ``mta_tta``, ``ft_tta``, ``mta_docs``, ``ft_docs``; ``mta:A`` / ``ft:A``
        interpolate the trained LoRA, see :func:`lora_mix`).
      sets: built-in eval set names and/or normalized-format folders.
      data_dir: benchmark data root (default ``$MTA_DATA_DIR``).
      ft_workdir: the FT baseline's workdir.
      log: progress lines.
      out_dir: the results folder (default ``workdir/eval``).
      predictions: also write ``predictions.jsonl.gz`` there: every item's choice per method
        (:mod:`mta_jax.eval.predictions`).

    Returns:
      The results dict (also written to disk).
    """
    is_decoder = config.model.kind == "decoder"
    unknown = sorted({lora_mix(decoder_methods.split_method(m)[0])[0] if is_decoder
                      else _encoder_method(lora_mix(m)[0])[0] for m in methods}
                     - set(methods_lib.METHODS) - set(TRAINED))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from "
                         f"{sorted(set(methods_lib.METHODS) | set(TRAINED))}")
    t0 = time.perf_counter()
    opts = sets_lib.Options.from_config(config.eval)
    groups = sets_lib.build_sets(list(sets), records.resolve_data_dir(data_dir), opts.protocol_seeds,
                                 opts.max_items)
    log(f"built {len(groups)} eval sets in {time.perf_counter() - t0:.1f}s")

    if is_decoder:  # prompts + LM scoring; none of the encoder machinery below applies
        name, scorers = _decoder_scorers(config, workdir, methods, ft_workdir, log)
        return _evaluate_and_write(scorers, groups, out_dir or pathlib.Path(workdir) / "eval", methods, sets,
                                   ft_workdir, name, t0, log, predictions)
    name, cfg, base, tok = workloads.load_backbone(config.model.path, config.model.dtype, False)
    trained, restored = {}, {}
    for m in methods:
        if lora_mix(m)[0] in TRAINED:
            src = ft_workdir if (m.startswith("ft") and ft_workdir is not None) else workdir
            if src not in restored:
                restored[src] = loop.restore_trained(src, base, name)
            trained[m] = restored[src]
    # Share the frozen bottom across methods: the lowest LoRA layer over all trained runs.
    first = min([s.lora.first_layer for s, _, _ in trained.values()] or [cfg.num_layers - 1])
    bank = encoders.SharedBottomEncoder(cfg, base, tok, first_layer=first, max_len=config.eval.max_len,
                                        batch_size=config.eval.batch_size,
                                        batch_tokens=config.eval.batch_tokens)
    adapt_kwargs = dict(shots=config.eval.adapt_shots,
                        max_support=config.eval.get("adapt_max_support", adapt_lib.DEFAULT_MAX_SUPPORT))
    scorers = {}
    for m in methods:
        if _encoder_method(m)[0] == "zero_shot":  # "zero_shot@STYLE": another doc rendering
            render = functools.partial(tool_text, style=_encoder_method(m)[1] or "name_desc")
            scorers[m] = methods_lib.embedding_scorer(bank.embed_fn(None), render=render)
        elif (mixed := lora_mix(m))[0] in ("mta", "ft"):
            settings, _, lora = trained[m]
            alpha = mixed[1]
            if alpha is not None:
                lora = dataclasses.replace(lora, scale=lora.scale * alpha)
            render = functools.partial(tool_text, style=settings.data.doc_style)  # as trained
            scorers[m] = methods_lib.embedding_scorer(bank.embed_fn(lora), render=render)
        elif m in ADAPTED_SUPPORT:
            settings, start = _adaptation(m, trained, workdir, config.eval,
                                          lambda: loop.restore_trained(workdir, base, name))
            scorers[m] = adapt_lib.adapt_scorer(bank, settings, start, support=ADAPTED_SUPPORT[m], **adapt_kwargs)
        else:
            scorers[m] = methods_lib.METHODS[m](methods_lib.MethodContext(config=config, workdir=workdir))
    # One frozen-bottom pass over every text any embedding method will see, in full batches.
    renders = [s.render for s in scorers.values() if isinstance(s, methods_lib.EmbeddingScorer)]
    if renders:
        t1 = time.perf_counter()
        texts = list(dict.fromkeys(t for r in renders for t in methods_lib.unique_texts(
            [tuple(g) for g in groups.values()], r)))
        bank.bottom_rows(texts)
        log(f"frozen bottom ({first} layers) over {len(texts)} texts in {time.perf_counter() - t1:.1f}s")
    return _evaluate_and_write(scorers, groups, out_dir or pathlib.Path(workdir) / "eval", methods, sets,
                               ft_workdir, name, t0, log, predictions)


def _adaptation(m: str, runs: dict, workdir, eval_config, restore_mta) -> tuple[Any, Any]:
    """``(settings, starting parameters)`` of an adapted method ``m`` (a key of :data:`ADAPTED_SUPPORT`).

    ``mta_*`` adapts the run's meta-parameters with its own inner loop; ``ft_*`` is the ablation
    that adapts the FT initialisation with the MTA run's inner loop (same steps, lr, shots), so
    "adaptation helps" and "a meta-learned initialisation helps" can be told apart. ``runs`` maps
    method names to :func:`loop.restore_trained` results; ``restore_mta()`` restores ``workdir``
    when no MTA method was asked for.
    """
    if m.startswith("mta"):
        s, meta_params, _ = runs[m]
        return dataclasses.replace(s, meta=test_time_meta(s.meta, eval_config)), meta_params
    ft_settings, _, ft_lora = runs[m]
    mta_run = next((runs[k] for k in TRAINED if k.startswith("mta") and k in runs), None)
    mta_settings = (mta_run or restore_mta())[0]
    if mta_settings.meta.inner.steps == 0:
        raise ValueError(f"{m} borrows the inner loop of {workdir}, which has inner_steps=0")
    return dataclasses.replace(ft_settings, meta=test_time_meta(mta_settings.meta, eval_config)), ft_lora


def test_time_meta(algo, eval_config):
    """The run's meta-config with the test-time inner loop of ``eval_config`` (``mta_adapt``/``ft_adapt``).

    ``eval.adapt_steps`` / ``eval.adapt_lr`` (0: as trained) replace the inner steps / SGD rate, so the
    test-time adaptation can be chosen on val sets without retraining; both adapted methods get the
    same loop. Meta-SGD adapts with its learned rates, so a test-time rate is an error there.

    Raises:
      ValueError: a negative value, or ``adapt_lr`` with Meta-SGD (naming the field).
    """
    steps, lr = int(eval_config.get("adapt_steps", 0)), float(eval_config.get("adapt_lr", 0.0))
    if steps < 0 or lr < 0:
        raise ValueError(f"config.eval.adapt_steps ({steps}) and config.eval.adapt_lr ({lr}) must be >= 0 "
                         "(0 = as trained)")
    if lr and algo.name == "meta_sgd":
        raise ValueError("config.eval.adapt_lr does not apply to meta_sgd, which adapts with its learned rates")
    inner = dataclasses.replace(algo.inner, steps=steps or algo.inner.steps, lr=lr or algo.inner.lr)
    return dataclasses.replace(algo, inner=inner)


def _encoder_method(name: str) -> tuple[str, str | None]:
    """``"zero_shot@full_name_desc"`` -> ``("zero_shot", "full_name_desc")``: the pretrained encoder
    with another doc rendering (trained methods always use the rendering they were trained with)."""
    base, _, style = name.partition("@")
    if style and base != "zero_shot":
        raise ValueError(f"method {name!r}: only zero_shot takes a @doc_style suffix")
    return base, style or None


def _decoder_scorers(config, workdir, methods, ft_workdir, log) -> tuple[str, dict]:
    """Decoder methods: ``zero_shot``/``ft``/``mta`` score candidate names with LoRA None / trained.

    A ``@norm`` or ``@gen`` suffix picks the variant (see :mod:`mta_jax.eval.decoder_methods`);
    ``random``/``bm25`` need no model; ``mta:A`` / ``ft:A`` interpolate the trained LoRA as for the
    encoder (:func:`lora_mix`) and take the suffixes too (``mta:0.5@norm``). ``mta_adapt`` /
    ``ft_adapt`` (k-shot) and ``mta_docs`` / ``ft_docs`` adapt as for the encoder
    (:class:`mta_jax.eval.adapt.DecoderAdaptScorer`) and take the same suffixes; ``mta_tta`` /
    ``ft_tta`` (entropy on unlabelled queries) are encoder-only. The constrained methods share one
    frozen-bottom pass per batch (:class:`mta_jax.eval.decoder_methods.SharedBottomScorers`).
    """
    bb = workloads.load_decoder_backbone(config.model.path, config.model.dtype, False)
    scorers, restored, runs, shared = {}, {}, {}, None

    def restore(src):
        if src not in restored:
            restored[src] = loop.restore_trained(src, bb.base, bb.name)
        return restored[src]

    for m in methods:
        base_name, variant = decoder_methods.split_method(m)
        base_name, alpha = lora_mix(base_name)  # "mta:0.5@norm": mta, interpolated, length-normalised
        if base_name in methods_lib.METHODS and base_name != "zero_shot":
            if variant:
                raise ValueError(f"method {m!r}: {base_name!r} has no decoder variants")
            scorers[m] = methods_lib.METHODS[m](methods_lib.MethodContext(config=config, workdir=workdir))
            continue
        if ADAPTED_SUPPORT.get(base_name) == "unlabelled":
            raise ValueError(f"{base_name} (entropy on unlabelled queries) is not implemented for decoder "
                             f"models; mta_adapt, ft_adapt, mta_docs and ft_docs are")
        lora = None
        if base_name in TRAINED:
            src = ft_workdir if (base_name.startswith("ft") and ft_workdir is not None) else workdir
            runs[base_name] = restore(src)
            lora = runs[base_name][2]
            if alpha is not None:
                lora = dataclasses.replace(lora, scale=lora.scale * alpha)
        if base_name in ADAPTED_SUPPORT:
            settings, start = _adaptation(base_name, runs, workdir, config.eval, lambda: restore(workdir))
            scorers[m] = adapt_lib.DecoderAdaptScorer(
                bb, settings, start, config.eval.adapt_shots,
                config.eval.get("adapt_max_support", adapt_lib.DEFAULT_MAX_SUPPORT), ADAPTED_SUPPORT[base_name],
                variant=variant, max_len=config.eval.max_len, batch_size=config.eval.batch_size, log=log)
            continue
        if variant == "@gen":
            scorers[m] = decoder_methods.generation_scorer(
                bb.cfg, bb.base, bb.tok, lora, eos_id=bb.eos_id, max_len=config.eval.max_len,
                batch_size=config.eval.batch_size, log=log)
            continue
        if shared is None:  # constrained scoring: every method continues from one frozen-bottom pass
            shared = decoder_methods.SharedBottomScorers(bb.cfg, bb.base, bb.tok, eos_id=bb.eos_id,
                                                         max_len=config.eval.max_len,
                                                         batch_size=config.eval.batch_size, log=log)
        scorers[m] = shared.scorer(m, lora, normalize=variant == "@norm")
    return bb.name, scorers


def _evaluate_and_write(scorers, groups, out, methods, sets, ft_workdir, name, t0, log, predictions) -> dict:
    """Runs the scorers on the groups and writes ``results.{json,md,png}``, ``run.json`` and, when
    ``predictions``, ``predictions.jsonl.gz`` to ``out``."""
    out = pathlib.Path(out)
    if predictions:
        with predictions_lib.Writer(out / "predictions.jsonl.gz") as writer:
            results = metrics_lib.evaluate(scorers, groups, log=log, on_scores=lambda m, s, sc: writer.write(
                predictions_lib.item_records(s, m, sc)))
        log(f"wrote {writer.count} item predictions to {writer.path}")
    else:
        results = metrics_lib.evaluate(scorers, groups, log=log)
        stale = out / "predictions.jsonl.gz"
        if stale.exists():  # an earlier evaluation's, which results.json no longer describes
            stale.unlink()
            log(f"removed {stale} of an earlier evaluation (rerun with predictions to write it again)")
    out.mkdir(parents=True, exist_ok=True)
    report.write_results(out / "results.json", results)
    (out / "results.md").write_text(report.markdown_table(results, list(methods)), encoding="utf-8")
    report.bar_chart(results, out / "results.png", list(methods))
    (out / "run.json").write_text(json.dumps({
        "methods": list(methods), "sets": list(sets), "ft_workdir": str(ft_workdir) if ft_workdir else None,
        "base": name, "devices": str(jax.devices()), "seconds": round(time.perf_counter() - t0, 1),
        "argv": sys.argv[1:]},  # the writing process's arguments: a sweep reuses only an identical evaluation
        indent=2), encoding="utf-8")
    return results
