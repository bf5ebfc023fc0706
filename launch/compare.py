"""Two methods of one evaluation compared query by query, from its ``predictions.jsonl.gz`` (no JAX).

  python launch/eval.py ... --methods=ft,mta --predictions      # writes OUT/predictions.jsonl.gz
  python launch/compare.py --predictions=OUT/predictions.jsonl.gz --a=mta --b=ft [--confusions=10]
  python launch/compare.py --predictions=runs/sweep/mta_s0/eval/predictions.jsonl.gz,runs/sweep/mta_s1/...

Per eval set: both accuracies (as in results.json), the queries where ``a`` is better / worse than
``b`` (a query's credit is its mean over the protocol seeds, which score the same queries with
other distractors) and the two-sided exact sign test over those queries — McNemar's test with the
query as the unit, a per-item complement to the std over protocol and training seeds. Several files
(e.g. one per training seed, evaluated on the same sets) are pooled: a query's credit is then its
mean over every file and protocol seed, and the accuracies are the means over the files. With
``--confusions=N``, also per set the accuracy per gold tool averaged over the tools (each tool
weighted equally: MetaTool's queries per tool range from 12 to 1,122), the N gold tools where ``a``
errs most (with ``b``'s errors on them) and the N most frequent (gold → chosen) pairs among ``a``'s
errors.
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags  # noqa: E402

_PREDICTIONS = flags.DEFINE_list("predictions", None, "predictions.jsonl.gz file(s) written by launch/eval.py "
                                 "--predictions; several are pooled (e.g. one per training seed).")
_A = flags.DEFINE_string("a", "mta", "Method compared ...")
_B = flags.DEFINE_string("b", "ft", "... against this one.")
_CONFUSIONS = flags.DEFINE_integer("confusions", 0, "Also list this many (gold -> chosen) pairs of a's errors per set.")
flags.mark_flags_as_required(["predictions"])


def report(paths, a: str, b: str, confusions: int = 0) -> str:
    """The markdown report for the predictions file(s) ``paths`` (see the module docstring).

    Raises:
      ValueError: ``a`` and ``b`` share no eval set (naming the methods the files hold).
    """
    from mta_jax.eval import predictions

    paths = [paths] if isinstance(paths, (str, pathlib.Path)) else list(paths)
    records = []
    for i, path in enumerate(paths):
        for r in predictions.read(path):
            if len(paths) > 1:  # pooled: file i's protocol seed s is the draw (i, s)
                r["seed"] = (i, r["seed"])
            records.append(r)
    rows = predictions.paired(records, a, b) if records else []
    if not rows:
        held = sorted({r["method"] for r in records})
        raise ValueError(f"{', '.join(map(str, paths))}: no eval set holds both {a!r} and {b!r}; "
                         f"the files hold methods {held}")
    lines = [] if len(paths) == 1 else [f"Pooled over {len(paths)} files: 'seeds' counts (file, protocol seed) pairs.", ""]
    lines += [f"| eval set | queries | seeds | {a} | {b} | {a} − {b} | queries {a} better / worse | sign-test p |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.set} | {r.queries} | {r.seeds} | {100 * r.acc_a:.1f} | {100 * r.acc_b:.1f} | "
                     f"{100 * (r.acc_a - r.acc_b):+.2f} | {r.wins} / {r.losses} | {r.p:.3g} |")
    if confusions > 0:
        for r in rows:
            lines += _error_tables(records, r, a, b, confusions)
    return "\n".join(lines)


def _error_tables(records, r, a: str, b: str, top: int) -> list[str]:
    """Markdown lines for eval set ``r.set``: per-gold-tool (macro) accuracy of ``a`` and ``b``, the
    ``top`` gold tools where ``a`` errs most, and ``a``'s ``top`` most frequent (gold → chosen) pairs."""
    from mta_jax.eval import predictions

    by_gold = predictions.errors_by_gold(records, (a, b), r.set)
    total = {m: sum(row[m] for row in by_gold.values()) for m in (a, b)}
    macro = {m: 100 * sum(1 - row[m] / row["items"] for row in by_gold.values()) / len(by_gold) for m in (a, b)}
    lines = ["", f"{r.set}: per gold tool, each of the {len(by_gold)} weighted equally: "
              f"{a} {macro[a]:.1f}, {b} {macro[b]:.1f}.",
              "", f"{r.set}: the gold tools where {a} errs most, over {r.seeds} seed(s) "
              f"({a}: {total[a]:.0f} errors, {b}: {total[b]:.0f})", "",
              f"| gold | items | {a} errors | {b} errors | share of {a}'s errors |", "|---|---:|---:|---:|---:|"]
    worst = sorted(by_gold.items(), key=lambda kv: -kv[1][a])[:top]
    lines += [f"| {g} | {row['items']} | {row[a]:.0f} | {row[b]:.0f} | {100 * row[a] / max(total[a], 1e-9):.0f}% |"
              for g, row in worst]
    counts = predictions.confusions(records, a, r.set)
    title = f"{r.set}: {a}'s most frequent errors over {r.seeds} seed(s) ({sum(counts.values())} wrong items)"
    lines += ["", title, "", "| gold | chosen | items |", "|---|---|---:|"]
    lines += [f"| {gold} | {chosen} | {n} |" for (gold, chosen), n in counts.most_common(top)]
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(report(_PREDICTIONS.value, _A.value, _B.value, _CONFUSIONS.value))


if __name__ == "__main__":
    app.run(main)
