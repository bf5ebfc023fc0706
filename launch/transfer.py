"""Within-task transfer of trained runs, from their ``metrics.jsonl`` alone (no model is loaded).

  python launch/transfer.py --workdirs=runs/sweep/mta_s0,runs/sweep/ft_s0 [--from_step=20]

Per run: the support loss before and after the inner loop, the query loss after it, and the share
of the support drop that reaches the episode's other queries (``transfer``). Support and query
items are drawn alike, so the support loss before adaptation stands in for the query loss before
it; for pooled FT, which does not adapt, ``L_q - L_s`` checks that stand-in (about 0). MAML can
only beat FT where the transfer is a good part of the step (BUILD_NOTES.md, session 22). Each
run's ``config.json`` gives its algorithm and support weight, for logs older than
``outer/query_loss``.
"""
import json
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Training workdirs (each with metrics.jsonl and config.json).")
_FROM_STEP = flags.DEFINE_integer("from_step", 0, "Ignore log rows before this step (e.g. the warm-up).")
flags.mark_flags_as_required(["workdirs"])


def table(workdirs, from_step: int = 0) -> str:
    """The markdown table for ``workdirs``."""
    from mta_jax.train import metrics

    lines = ["| run | algorithm | rows | L_s before | L_s after | L_q after | query gain (± sem) | transfer |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for wd in workdirs:
        path = pathlib.Path(wd) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {wd} a training workdir?")
        meta = json.loads(path.read_text(encoding="utf-8")).get("meta") or {}
        missing = [f"meta.{k}" for k in ("algorithm", "support_weight") if k not in meta]
        if missing:
            raise ValueError(f"{path}: no {missing}; the transfer needs the run's algorithm and support weight")
        algorithm, weight = meta["algorithm"], float(meta["support_weight"])
        try:
            t = metrics.within_task_transfer(metrics.read_metrics(wd), algorithm=algorithm,
                                             support_weight=weight, from_step=from_step)
        except ValueError as e:
            raise ValueError(f"{pathlib.Path(wd) / 'metrics.jsonl'}: {e}") from e
        share = "–" if t.fraction is None else f"{100 * t.fraction:.0f}%"
        lines.append(f"| {wd} | {algorithm} | {t.rows} | {t.support_pre:.3f} | {t.support_post:.3f} | "
                     f"{t.query_post:.3f} | {t.query_gain:+.3f} ± {t.gain_sem:.3f} | {share} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(table(_WORKDIRS.value, _FROM_STEP.value))


if __name__ == "__main__":
    app.run(main)
