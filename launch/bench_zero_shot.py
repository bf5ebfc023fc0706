"""Evaluates the baselines (zero-shot MiniLM, BM25, random) and writes results.json / .md / .png.

``python launch/bench_zero_shot.py --workdir /tmp/zs --sets=metatool/test_sd,bfcl/multiple``
(default sets: the paper table's test sets; about 10-20 CPU minutes for all of them on 2 cores).
Reference zero-shot accuracy (all-MiniLM-L6-v2, ``"{name}: {description}"``): MetaTool test SD 86.0,
CD 88.5; BFCL multiple 97.5, live_multiple 89.1; Seal-Tools dev 87.7, test_in_domain 86.1;
API-Bank level-1 71.6.
"""
import pathlib
import sys

# Replace launch/ (whose select.py would shadow the stdlib module) by the repo root.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags, logging  # noqa: E402

from launch import _common  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder for results.json/.md and accuracy.png.")
_SETS = flags.DEFINE_list("sets", None, "Eval sets (built-in names or normalized dirs); default TEST_SETS.")
_METHODS = flags.DEFINE_list("methods", ["random", "bm25", "zero_shot"], "Methods (keys of METHODS).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Encoder rows per call.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _common.setup_jax()
    from mta_jax.eval import methods, metrics, report, sets

    unknown = [m for m in _METHODS.value if m not in methods.METHODS]
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; have {sorted(methods.METHODS)}")
    groups = sets.build_sets(_SETS.value or sets.TEST_SETS, _common.DATA_DIR.value)
    ctx = methods.MethodContext(workdir=pathlib.Path(_WORKDIR.value), data_dir=_common.DATA_DIR.value,
                                batch_size=_BATCH.value)
    scorers = {m: methods.METHODS[m](ctx) for m in _METHODS.value}
    results = metrics.evaluate(scorers, groups, log=logging.info)
    paths = report.write_report(results, _WORKDIR.value)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    app.run(main)
