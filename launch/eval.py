"""Evaluates tool selection on unseen tools and writes ``DIR/eval/results.json``, a table and a chart.

  python launch/eval.py --config configs/minilm_mta.py --workdir DIR \
      [--methods=random,bm25,zero_shot,mta,ft] [--eval_dirs=D1,D2] [--ft_workdir=FT_DIR] [--out_dir=OUT]
      [--predictions]

``random``, ``bm25`` and ``zero_shot`` need no checkpoint; ``mta``, ``mta_adapt`` (k-shot
adaptation on labelled queries of the unseen tools) and ``mta_tta`` (adaptation on unlabelled
queries) use the workdir's checkpoint; ``ft``, ``ft_adapt`` and ``ft_tta`` use ``--ft_workdir`` when
given, else the workdir's checkpoint (the ``*_adapt``/``*_tta`` pairs share the workdir's inner loop).
Built-in sets come from ``config.eval.sets`` (override with ``--sets``); ``--eval_dirs`` adds every
split file of each normalized-format folder as ``<basename>/<split stem>``. ``--predictions`` also
writes every item's choice per method (``OUT/predictions.jsonl.gz``), which ``launch/compare.py``
reads for per-query paired tests and confusions.
"""
import json
import pathlib
import sys

# Replace launch/ (whose select.py would shadow the stdlib module) by the repo root.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import _common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir; results go to DIR/eval/.")
_METHODS = flags.DEFINE_list("methods", None, "Methods to run (default: config.eval.methods).")
_SETS = flags.DEFINE_list("sets", None, "Built-in eval sets (default: config.eval.sets).")
_EVAL_DIRS = flags.DEFINE_list("eval_dirs", [], "Extra normalized-format data folders to evaluate.")
_FT_WORKDIR = flags.DEFINE_string("ft_workdir", None, "Workdir of the FT baseline (default: --workdir).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where results.{json,md,png} go (default: WORKDIR/eval); "
                               "another folder keeps an earlier evaluation of the run.")
_PREDICTIONS = flags.DEFINE_bool("predictions", False, "Also write OUT/predictions.jsonl.gz (per item: "
                                  "gold, credit, top-5 candidates per method).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    _common.start(argv)
    from mta_jax.train import evaluate as evaluation

    config = _CONFIG.value
    evaluation.run(
        config=config, workdir=pathlib.Path(_WORKDIR.value),
        methods=tuple(_METHODS.value or config.eval.methods),
        sets=tuple(_SETS.value if _SETS.value is not None else config.eval.sets) + tuple(_EVAL_DIRS.value),
        data_dir=_common.DATA_DIR.value,
        ft_workdir=pathlib.Path(_FT_WORKDIR.value) if _FT_WORKDIR.value else None,
        out_dir=pathlib.Path(_OUT_DIR.value) if _OUT_DIR.value else None,
        log=logging.info, predictions=_PREDICTIONS.value)
    out = pathlib.Path(_OUT_DIR.value or pathlib.Path(_WORKDIR.value) / "eval")
    print((out / "results.md").read_text(encoding="utf-8"))
    logging.info("wrote %s", json.dumps(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    app.run(main)
