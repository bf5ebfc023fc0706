"""Tables over training seeds: several runs' ``results.json`` folded into mean ± std per cell.

A protocol set's ``accuracy`` in one ``results.json`` is already a mean over the five protocol
seeds (draws of distractors) for *one* trained model; its ``std`` says nothing about how much the
training seed (episodes, LoRA init) moves that model. A sweep trains every method once per
training seed and reports, per eval set and method, the mean and sample std over training seeds,
and for method pairs the *paired* difference (same seed, same episodes) with its std and the number
of seeds on which the first method wins. Numbers stay fractions in [0, 1], as in ``results.json``.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping, Sequence

from mta_jax.eval import report
from mta_jax.eval.metrics import STD_DDOF


def _mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    m = sum(xs) / len(xs)
    if len(xs) <= STD_DDOF:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - STD_DDOF))


def _check_methods(per_seed: Mapping[int, dict], set_name: str, methods: Sequence[str]) -> None:
    """Raises KeyError if a seed lacks one of ``methods`` on ``set_name``."""
    for seed, results in per_seed.items():
        missing = [m for m in methods if m not in results.get(set_name, {})]
        if missing:
            raise KeyError(f"training seed {seed}: results for {set_name!r} lack methods {missing}")


def aggregate(per_seed: Mapping[int, dict], methods: Sequence[str] | None = None) -> dict:
    """Folds per-seed results into ``{set: {method: {"mean", "std", "per_seed", "n"[, "n_total"]}}}``.

    Args:
      per_seed: ``{training seed: results dict}`` (each valid under ``report.validate_results``).
      methods: methods to fold, in this order, where the first seed has them on a set (default:
        all of the first seed's methods on that set).

    Raises:
      ValueError: no seeds, or the seeds disagree on which eval sets they hold.
      KeyError: a seed lacks a method on some set (naming both).
      report.ResultsSchemaError: a results dict breaks the schema.
    """
    if not per_seed:
        raise ValueError("aggregate needs at least one training seed")
    for seed, results in per_seed.items():
        report.validate_results(results, source=f"training seed {seed}")
    seeds = sorted(per_seed)
    sets = list(per_seed[seeds[0]])
    for seed in seeds[1:]:
        if set(per_seed[seed]) != set(sets):
            raise ValueError(f"training seed {seed} has eval sets {sorted(per_seed[seed])}, "
                             f"seed {seeds[0]} has {sorted(sets)}")
    out: dict = {}
    for s in sets:
        first = per_seed[seeds[0]][s]
        ms = [m for m in methods if m in first] if methods is not None else list(first)
        _check_methods(per_seed, s, ms)
        out[s] = {}
        for m in ms:
            accs = [per_seed[seed][s][m]["accuracy"] for seed in seeds]
            mean, std = _mean_std(accs)
            entry = per_seed[seeds[0]][s][m]
            out[s][m] = {"mean": mean, "std": std, "per_seed": accs, "n": entry["n"]}
            if "n_total" in entry:  # the seeds scored a random subset (eval.max_items)
                out[s][m]["n_total"] = entry["n_total"]
    return out


def sign_test(wins: int, losses: int) -> float | None:
    """One-sided exact sign test: ``P(W >= wins)`` for ``W ~ Binomial(wins + losses, 1/2)``.

    The chance that a method no better than the other wins at least ``wins`` of the seeds that are
    not ties (ties are dropped, as the sign test defines); ``None`` when every seed is a tie.
    """
    n = wins + losses
    if n == 0:
        return None
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def paired(per_seed: Mapping[int, dict], a: str, b: str) -> dict:
    """``{set: {"mean", "std", "wins", "losses", "seeds", "t", "sign_p"}}`` of the per-seed
    difference ``a − b``.

    ``wins`` / ``losses`` count the seeds where ``a`` is strictly better / worse; ``t`` is the paired
    t statistic ``mean / (std / sqrt(seeds))`` (None below two seeds or for a zero std) and
    ``sign_p`` the one-sided sign test of ``a`` beating ``b`` (:func:`sign_test`). Sets where the
    first seed lacks ``a`` or ``b`` are left out; raises KeyError when another seed lacks one the
    first seed has.
    """
    seeds = sorted(per_seed)
    out = {}
    for s, row in per_seed[seeds[0]].items():
        if a not in row or b not in row:
            continue
        _check_methods(per_seed, s, (a, b))
        diffs = [per_seed[seed][s][a]["accuracy"] - per_seed[seed][s][b]["accuracy"] for seed in seeds]
        mean, std = _mean_std(diffs)
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        t = mean / (std / math.sqrt(len(diffs))) if std else None
        out[s] = {"mean": mean, "std": std, "wins": wins, "losses": losses, "seeds": len(seeds),
                  "t": t, "sign_p": sign_test(wins, losses)}
    return out


def mta_ft_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """Every ``(mta<suffix>, ft<suffix>)`` both present in ``methods``, in ``methods``' order:
    ``mta`` / ``ft``, ``mta_adapt`` / ``ft_adapt``, ``mta:0.5`` / ``ft:0.5``, ... — each MTA method
    against the FT baseline given the same treatment."""
    return [(m, "ft" + m[3:]) for m in methods if m.startswith("mta") and "ft" + m[3:] in methods]


def _pct(mean: float, std: float | None, signed: bool = False) -> str:
    cell = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return cell if std is None else f"{cell} ± {100 * std:.1f}"


def _pair_cell(p: Mapping) -> str:
    cell = f"{_pct(p['mean'], p['std'], signed=True)} ({p['wins']}/{p['seeds']}"
    # Below three seeds the smallest possible p is 0.25: not worth a column's width.
    if p["seeds"] >= 3 and p.get("sign_p") is not None:
        cell += f", p {p['sign_p']:.3f}"
    return cell + ")"


def markdown(table: dict, pairs: Mapping[str, dict] | None = None) -> str:
    """Markdown: rows = eval sets; a column per method (mean ± std over training seeds, %), then one
    per pair (``"a − b"``: paired mean ± std, wins/seeds and, from three seeds, the one-sided sign
    test's p)."""
    methods: dict[str, None] = {}
    for row in table.values():
        methods.update(dict.fromkeys(row))
    pairs = dict(pairs or {})
    head = list(methods) + list(pairs)
    lines = ["| eval set | n | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    for s, row in table.items():
        n = report.n_cell(next(iter(row.values())))
        cells = [_pct(row[m]["mean"], row[m]["std"]) if m in row else "–" for m in methods]
        cells += [_pair_cell(p[s]) if s in p else "–" for p in pairs.values()]
        lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_runs(paths: Mapping[int, str | pathlib.Path]) -> dict[int, dict]:
    """``{seed: results}`` from ``{seed: path of a results.json}`` (each validated on read)."""
    return {seed: report.read_results(p) for seed, p in paths.items()}


def write(out_dir: str | pathlib.Path, per_seed: Mapping[int, dict], methods: Sequence[str],
          pairs: Sequence[tuple[str, str]]) -> tuple[pathlib.Path, str]:
    """Writes ``sweep.json`` (table, pairs, per-seed inputs) and ``sweep.md``; returns (dir, markdown)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = aggregate(per_seed, methods)
    diffs = {f"{a} − {b}": paired(per_seed, a, b) for a, b in pairs}
    md = markdown(table, diffs)
    (out_dir / "sweep.json").write_text(json.dumps(
        {"seeds": sorted(per_seed), "table": table, "pairs": diffs}, indent=1, allow_nan=False) + "\n",
        encoding="utf-8")
    (out_dir / "sweep.md").write_text(md, encoding="utf-8")
    return out_dir, md


def _newest_mtime(folder: pathlib.Path) -> float:
    return max((f.stat().st_mtime for f in folder.rglob("*") if f.is_file()), default=0.0)


_COMPARED_APART = ("--methods", "--sets", "--ft_workdir")  # compared by their resolved values in run.json


def _settings_args(argv: Sequence[str]) -> list[str]:
    """``launch/eval.py`` arguments without the methods, sets and FT workdir (``--f=v`` or ``--f v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _COMPARED_APART:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in _COMPARED_APART)):
            out.append(a)
    return out


def evaluation_is_current(mta_dir: str | pathlib.Path, methods: Sequence[str], sets: Sequence[str] | None,
                          ft_dir: str | pathlib.Path | None = None, argv: Sequence[str] | None = None) -> bool:
    """Whether ``mta_dir/eval`` already holds this evaluation, so a resumed sweep can skip it.

    True only if ``results.json`` and ``run.json`` exist, ``run.json`` lists the same methods, the
    same explicit ``sets`` (``None`` — the config's default sets — is never taken as current), the
    same FT workdir and, if ``argv`` is given, the same other ``launch/eval.py`` arguments (config
    file, ``--config.*`` overrides, data dir), and ``results.json`` is newer than every checkpoint
    file and ``config.json`` of both runs.
    """
    mta_dir = pathlib.Path(mta_dir)
    results, run = mta_dir / "eval" / "results.json", mta_dir / "eval" / "run.json"
    if sets is None or not (results.is_file() and run.is_file()):
        return False
    meta = json.loads(run.read_text(encoding="utf-8"))
    if (list(meta.get("methods", [])) != list(methods) or list(meta.get("sets", [])) != list(sets)
            or meta.get("ft_workdir") != (str(ft_dir) if ft_dir is not None else None)):
        return False
    if argv is not None and (meta.get("argv") is None or _settings_args(meta["argv"]) != _settings_args(argv)):
        return False
    written = results.stat().st_mtime

    def newest(d: pathlib.Path) -> float:
        config = d / "config.json"
        return max(_newest_mtime(d / "checkpoints"), config.stat().st_mtime if config.is_file() else 0.0)
    return all(written >= newest(pathlib.Path(d)) for d in (mta_dir, ft_dir) if d is not None)
