"""Per-item predictions: what each method chose on each item, and paired comparisons over them.

``launch/eval.py --predictions`` writes ``OUT/predictions.jsonl.gz``, one JSON object per (eval
set, protocol seed, item, method)::

    {"set": "metatool/val_sd", "seed": 0, "id": "...", "method": "mta", "gold": ["..."],
     "credit": 1.0, "top": [["tool_a", 0.71], ["tool_b", 0.64], ...]}

``credit`` is the item's top-1 credit as ``results.json`` counts it (:func:`metrics.top1_credit`:
1 or 0, a fraction for exact ties, 0 for an abstention), so the mean credit of a set and seed is
its accuracy; ``top`` holds the :data:`TOP` highest-scored candidates, best first (ties in candidate
order; empty for an abstention), with scores rounded to 5 decimals.

:func:`paired` compares two methods item by item. The unit is the *query*: a protocol set scores
the same queries once per seed with other distractors, so a query's credit is its mean over the
seeds, and the sign test counts queries (a seed's copy of a query is not an independent draw).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import pathlib
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from mta_jax.eval import metrics as metrics_lib

if TYPE_CHECKING:
    from mta_jax.eval.sets import EvalSet

TOP = 5
FIELDS = ("set", "seed", "id", "method", "gold", "credit", "top")


def item_records(eval_set: EvalSet, method: str, scores: Sequence[np.ndarray],
                 top: int = TOP) -> Iterator[dict]:
    """One record per item of ``eval_set`` for ``method``'s ``scores`` (as :func:`metrics.set_metrics` takes them)."""
    for item, cands, s in metrics_lib.scored_items(eval_set, scores):
        s = np.asarray(s, np.float64)
        abstained = bool(np.all(s == metrics_lib.ABSTAIN))
        order = [] if abstained else np.argsort(-s, kind="stable")[:top]
        yield {"set": eval_set.name, "seed": eval_set.seed, "id": item.id, "method": method,
               "gold": list(item.gold), "credit": metrics_lib.top1_credit(s, cands, item.gold),
               "top": [[cands[i], round(float(s[i]), 5)] for i in order]}


class Writer:
    """Streams records to a gzipped JSONL file; it appears under its name only once closed cleanly.

    Use as a context manager; an exception inside leaves no file (and no partial one) behind.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = None
        self.count = 0

    def __enter__(self) -> "Writer":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = gzip.open(self._tmp, "wt", encoding="utf-8")
        return self

    def write(self, records: Iterable[dict]) -> None:
        for r in records:
            self._file.write(json.dumps(r, allow_nan=False) + "\n")
            self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def read(path: str | os.PathLike) -> list[dict]:
    """Reads a predictions file (gzipped or plain JSONL), checking every record's fields.

    Raises:
      ValueError: a line that is not a JSON object with the fields of :data:`FIELDS`, a credit
        outside [0, 1], or the same (set, seed, id, method) twice — naming the file and line.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    out, seen = [], set()
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            where = f"{path}: line {line_no}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(r, dict) or (missing := [k for k in FIELDS if k not in r]):
                raise ValueError(f"{where}: a record needs the fields {list(FIELDS)}"
                                 + (f"; missing {missing}" if isinstance(r, dict) else ""))
            c = r["credit"]
            if not (isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 <= c <= 1.0):
                raise ValueError(f"{where}: credit {c!r} must be a number in [0, 1]")
            key = (r["set"], r["seed"], r["id"], r["method"])
            if key in seen:
                raise ValueError(f"{where}: a second record for set {key[0]!r}, seed {key[1]}, item {key[2]!r}, "
                                 f"method {key[3]!r}")
            seen.add(key)
            out.append(r)
    return out


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test on the discordant pairs): ``P(|W - n/2| >= |wins - n/2|)``
    for ``W ~ Binomial(n = wins + losses, 1/2)``; 1.0 when ``n = 0``."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # exact integers: 2.0 ** n overflows past n = 1023
    return min(1.0, 2.0 * tail)


@dataclasses.dataclass(frozen=True)
class Paired:
    """Method ``a`` against method ``b`` on one eval set, per query (credit averaged over the seeds).

    ``acc_a`` / ``acc_b`` equal the results.json accuracies (mean over seeds of the mean over
    items); ``wins`` / ``losses`` count queries where ``a``'s mean credit is above / below ``b``'s.
    """

    set: str
    queries: int
    seeds: int
    acc_a: float
    acc_b: float
    wins: int
    losses: int

    @property
    def p(self) -> float:
        return sign_test_p(self.wins, self.losses)


def paired(records: Iterable[dict], a: str, b: str) -> list[Paired]:
    """:class:`Paired` per eval set holding both methods, in the records' set order.

    Raises:
      ValueError: neither method is in the records, or a set where the two methods' (seed, item)
        keys differ (a comparison on different items would not be paired), naming the set.
    """
    credit: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["method"] in (a, b):
            credit[r["set"]][r["method"]][(r["seed"], r["id"])] = float(r["credit"])
    if not credit:
        raise ValueError(f"no records of {a!r} or {b!r}")
    out = []
    for name, by_method in credit.items():
        if a not in by_method or b not in by_method:
            continue
        ca, cb = by_method[a], by_method[b]
        if ca.keys() != cb.keys():
            raise ValueError(f"{name}: {a!r} and {b!r} scored different items ({len(ca)} vs {len(cb)} "
                             f"(seed, item) pairs)")
        per_query: dict[str, list[float]] = defaultdict(list)
        for key in ca:
            per_query[key[1]].append(ca[key] - cb[key])
        diffs = np.array([np.mean(v) for v in per_query.values()])
        seeds = {k[0] for k in ca}
        out.append(Paired(set=name, queries=len(per_query), seeds=len(seeds),
                          acc_a=_accuracy(ca), acc_b=_accuracy(cb),
                          wins=int((diffs > 1e-12).sum()), losses=int((diffs < -1e-12).sum())))
    return out


def _accuracy(credit: dict[tuple, float]) -> float:
    """Mean over seeds of the per-seed mean credit (as results.json averages a protocol group)."""
    by_seed: dict = defaultdict(list)
    for (seed, _), c in credit.items():
        by_seed[seed].append(c)
    return float(np.mean([np.mean(v) for v in by_seed.values()]))


def confusions(records: Iterable[dict], method: str, eval_set: str) -> Counter:
    """``Counter{(gold, chosen): count}`` over ``method``'s wrong answers on ``eval_set`` (all seeds).

    An item counts when its credit is 0 and it chose something; ``gold`` joins an item's gold
    tools with ``|``.
    """
    out: Counter = Counter()
    for r in records:
        if r["method"] == method and r["set"] == eval_set and r["credit"] == 0 and r["top"]:
            out[("|".join(r["gold"]), r["top"][0][0])] += 1
    return out


def errors_by_gold(records: Iterable[dict], methods: Sequence[str], eval_set: str) -> dict[str, dict]:
    """Per gold tool of ``eval_set`` (an item's gold tools joined with ``|``): ``{"items": n, method:
    errors, ...}`` over all seeds, where an item's errors are ``1 - credit``.

    MetaTool's items are very unbalanced across tools (12 to 1,122 queries per tool), so a few
    gold tools can hold most of a method's errors; this is where to look first.
    """
    out: dict[str, dict] = {}
    counted: dict[str, set] = defaultdict(set)
    for r in records:
        if r["set"] != eval_set or r["method"] not in methods:
            continue
        gold = "|".join(r["gold"])
        row = out.setdefault(gold, {"items": 0, **{m: 0.0 for m in methods}})
        row[r["method"]] += 1.0 - float(r["credit"])
        key = (r["seed"], r["id"])
        if key not in counted[gold]:
            counted[gold].add(key)
            row["items"] += 1
    return out
