"""``results.json`` (schema, writer, checked reader), the markdown results table and a bar chart.

Schema::

    {eval_set: {method: {"accuracy": float in [0, 1], "std": float >= 0 | null, "n": int > 0,
                         "recall@5"?: float in [0, 1], "ndcg@10"?: float in [0, 1],
                         "skipped_empty_gold"?: int >= 0, "seeds"?: int >= 2, "seconds"?: float >= 0,
                         "protocol_seeds"?: [int, ...], "n_total"?: int >= n}}}

``std`` is the sample standard deviation over protocol seeds (see ``metrics.STD_DDOF``) and
null for single-set rows; ``n`` is the number of items per seed; ``protocol_seeds`` lists the seed
files a MetaTool / ToolLens row averages (all five unless ``eval.protocol_seeds`` chose fewer);
``n_total`` appears when ``eval.max_items`` scored a random subset of ``n`` of a set's ``n_total`` items.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

_UNIT = ("accuracy", "recall@5", "ndcg@10")  # fractions in [0, 1]
_REQUIRED = ("accuracy", "std", "n")
_OPTIONAL = ("recall@5", "ndcg@10", "skipped_empty_gold", "seeds", "seconds", "protocol_seeds", "n_total")


class ResultsSchemaError(ValueError):
    """A results file or dict does not follow the ``results.json`` schema."""


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_results(results, source: str = "results") -> None:
    """Checks ``results`` against the schema.

    Args:
      results: the parsed object.
      source: where it came from, prefixed to error messages.

    Raises:
      ResultsSchemaError: naming the offending ``set/method/field``.
    """
    if not isinstance(results, dict):
        raise ResultsSchemaError(f"{source}: top level must be an object, got {type(results).__name__}")
    for set_name, row in results.items():
        if not isinstance(row, dict):
            raise ResultsSchemaError(f"{source}: [{set_name!r}] must be an object of methods")
        for method, e in row.items():
            where = f"{source}: [{set_name!r}][{method!r}]"
            if not isinstance(e, dict):
                raise ResultsSchemaError(f"{where} must be an object")
            missing = [k for k in _REQUIRED if k not in e]
            unknown = [k for k in e if k not in _REQUIRED + _OPTIONAL]
            if missing or unknown:
                raise ResultsSchemaError(f"{where}: missing fields {missing}, unknown fields {unknown}")
            for k in _UNIT:
                if k in e and not (_is_num(e[k]) and 0.0 <= e[k] <= 1.0):
                    raise ResultsSchemaError(f"{where}[{k!r}] = {e[k]!r}: must be a number in [0, 1]")
            if e["std"] is not None and not (_is_num(e["std"]) and e["std"] >= 0):
                raise ResultsSchemaError(f"{where}['std'] = {e['std']!r}: must be null or a number >= 0")
            if not (_is_int(e["n"]) and e["n"] > 0):
                raise ResultsSchemaError(f"{where}['n'] = {e['n']!r}: must be an integer > 0")
            if "skipped_empty_gold" in e and not (_is_int(e["skipped_empty_gold"])
                                                  and e["skipped_empty_gold"] >= 0):
                raise ResultsSchemaError(f"{where}['skipped_empty_gold'] = "
                                         f"{e['skipped_empty_gold']!r}: must be an integer >= 0")
            if "seeds" in e and not (_is_int(e["seeds"]) and e["seeds"] >= 2):
                raise ResultsSchemaError(f"{where}['seeds'] = {e['seeds']!r}: must be an integer >= 2")
            if "protocol_seeds" in e and not (isinstance(e["protocol_seeds"], list) and e["protocol_seeds"]
                                              and all(_is_int(x) for x in e["protocol_seeds"])):
                raise ResultsSchemaError(f"{where}['protocol_seeds'] = {e['protocol_seeds']!r}: must be a "
                                         "non-empty list of integers")
            if "n_total" in e and not (_is_int(e["n_total"]) and e["n_total"] >= e["n"]):
                raise ResultsSchemaError(f"{where}['n_total'] = {e['n_total']!r}: must be an integer >= n "
                                         f"({e['n']})")
            if "seconds" in e and not (_is_num(e["seconds"]) and e["seconds"] >= 0):
                raise ResultsSchemaError(f"{where}['seconds'] = {e['seconds']!r}: must be a number >= 0")


def write_results(path: str | pathlib.Path, results: dict) -> pathlib.Path:
    """Validates ``results`` and writes it as indented JSON (keys in insertion order)."""
    validate_results(results, source=str(path))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_results(path: str | pathlib.Path) -> dict:
    """Reads and validates a ``results.json``."""
    path = pathlib.Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsSchemaError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
    validate_results(results, source=str(path))
    return results


def _methods(results: dict) -> list[str]:
    seen: dict[str, None] = {}
    for row in results.values():
        seen.update(dict.fromkeys(row))
    return list(seen)


def format_cell(entry: dict | None) -> str:
    """``"86.0 ± 0.4"`` (percent, one decimal); just the mean when std is null; ``"–"`` if absent."""
    if entry is None:
        return "–"
    cell = f"{100 * entry['accuracy']:.1f}"
    return cell if entry["std"] is None else f"{cell} ± {100 * entry['std']:.1f}"


def n_cell(entry: dict) -> str:
    """A table's ``n`` column: ``"1920"``, or ``"500 of 4618"`` for a random subset (``eval.max_items``)."""
    n = entry.get("n", 0)
    return f"{n} of {entry['n_total']}" if "n_total" in entry else str(n)


def markdown_table(results: dict, methods: Sequence[str] | None = None) -> str:
    """Rows = eval sets, columns = methods, cells = top-1 accuracy in percent (mean ± std)."""
    validate_results(results)
    methods = list(methods) if methods is not None else _methods(results)
    lines = ["| eval set | n | " + " | ".join(methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]
    for set_name, row in results.items():
        lines.append(f"| {set_name} | {n_cell(next(iter(row.values()), {}))} | "
                     + " | ".join(format_cell(row.get(m)) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: str | pathlib.Path, methods: Sequence[str] | None = None,
              title: str = "Top-1 tool-selection accuracy") -> pathlib.Path:
    """Grouped bar chart (one group per eval set, one bar per method, std as error bars) as PNG."""
    import matplotlib
    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    validate_results(results)
    methods = list(methods) if methods is not None else _methods(results)
    sets = list(results)
    x = np.arange(len(sets))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(sets) * max(1, len(methods)) ** 0.5), 4.0))
    try:
        for j, m in enumerate(methods):
            acc = [100 * results[s][m]["accuracy"] if m in results[s] else np.nan for s in sets]
            # NaN draws no error bar: single-set rows have no spread to show, not a spread of 0.
            err = [100 * results[s][m]["std"] if m in results[s] and results[s][m]["std"] is not None
                   else np.nan for s in sets]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, acc, width, yerr=err, capsize=2, label=m)
        ax.set_xticks(x, sets, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 115)  # headroom above 100 % for the legend
        ax.set_yticks(np.arange(0, 101, 20))
        ax.set_title(title)
        ax.legend(fontsize=8, ncols=min(len(methods), 4), loc="upper center")
        fig.tight_layout()
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def write_report(results: dict, workdir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes ``results.json``, ``results.md`` (the table) and ``accuracy.png`` into ``workdir``."""
    workdir = pathlib.Path(workdir)
    out = {"json": write_results(workdir / "results.json", results)}
    out["markdown"] = workdir / "results.md"
    out["markdown"].write_text(markdown_table(results), encoding="utf-8")
    out["png"] = bar_chart(results, workdir / "accuracy.png")
    return out
