"""Metric logging: ``metrics.jsonl`` (one object per log step) and a one-line progress bar with ETA."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Mapping, Sequence

import numpy as np


def _scalar(v):
    v = np.asarray(v)
    if v.size != 1:
        raise ValueError(f"metric of shape {v.shape} is not a scalar")
    x = v.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no NaN/inf; keep them visible rather than dropping the row
    return x


class MetricWriter:
    """Appends JSON lines to ``<workdir>/metrics.jsonl``; wall-clock fields end in ``_sec``.

    A resumed run first calls :meth:`resume_at` with the step it restored, so the file keeps one
    row per logged step: the rows written after that checkpoint by the interrupted run (which the
    resumed run recomputes) are dropped.
    """

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def resume_at(self, step: int) -> int:
        """Drops the rows after ``step`` and a last line cut off by a kill mid-write; returns how
        many lines were dropped.

        Raises:
          ValueError: a line other than the last is not valid JSON (named; the file is left as is).
        """
        if not self.path.is_file():
            return 0
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        kept = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) and not text.endswith("\n"):
                    continue  # the partial row of a killed write
                raise ValueError(f"{self.path}:{i}: not valid JSON ({e})") from e
            if int(row.get("step", 0)) <= step:
                kept.append(line)
        if len(kept) != len(lines):
            tmp = self.path.with_suffix(".jsonl.part")
            tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
            tmp.replace(self.path)
        return len(lines) - len(kept)

    def write(self, step: int, metrics: Mapping[str, object]) -> dict:
        row = {"step": int(step), **{k: _scalar(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
    """Reads ``metrics.jsonl`` back (for tests and plots)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from e
    return rows


# The algorithms whose objective is ``L_q(adapted) + support_weight * L_s`` (mta_jax/meta/algorithms.py;
# named here so reading logs does not import JAX; tests/test_train_metrics.py checks the two agree).
MAML_FAMILY = ("maml", "fomaml", "anil", "meta_sgd")


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Means over the log rows of a run (see :func:`within_task_transfer`)."""
    rows: int
    support_pre: float    # inner/loss_pre: the support loss at the initialisation
    support_post: float   # inner/loss_post: the support loss after the inner loop
    query_post: float     # outer/query_loss: the query loss after it (pooled: at the initialisation)
    gain_sem: float       # standard error over rows of support_pre - query_post

    @property
    def support_drop(self) -> float:
        return self.support_pre - self.support_post

    @property
    def query_gain(self) -> float:
        return self.support_pre - self.query_post

    @property
    def fraction(self) -> float | None:
        """``query_gain / support_drop``: the share of the inner step that reaches the queries
        (None without adaptation, where the support loss does not move)."""
        return self.query_gain / self.support_drop if self.support_drop > 0 else None


def query_losses(rows: Sequence[Mapping], algorithm: str, support_weight: float) -> list[float]:
    """Each row's query loss: ``outer/query_loss``, or for logs written before that key existed,
    recovered from ``outer/loss`` (MAML family: ``L_q + w L_s``; pooled: ``(L_s + L_q) / 2``).
    Where both exist they must agree (to float32 rounding), which catches a log that does not
    belong to the given algorithm and support weight.

    Raises:
      ValueError: a row lacks the keys needed or disagrees with itself (naming its step), or the
        algorithm's objective does not determine the query loss (Reptile, iMAML without the key).
    """
    out = []
    for row in rows:
        logged = row.get("outer/query_loss")
        derived = None
        if "outer/loss" in row and "inner/loss_pre" in row:
            loss, pre = float(row["outer/loss"]), float(row["inner/loss_pre"])
            if algorithm in MAML_FAMILY:
                derived = loss - support_weight * pre
            elif algorithm == "pooled":
                derived = 2.0 * loss - pre
        if logged is None and derived is None:
            missing = [k for k in ("outer/loss", "inner/loss_pre") if k not in row]
            if missing:
                raise ValueError(f"metrics row of step {row.get('step')} has no outer/query_loss and no {missing}")
            raise ValueError(f"metrics row of step {row.get('step')} has no outer/query_loss, and "
                             f"{algorithm!r}'s outer/loss does not determine it")
        if logged is not None and derived is not None and abs(float(logged) - derived) > 1e-4 * max(1.0, abs(derived)):
            raise ValueError(f"metrics row of step {row.get('step')}: outer/query_loss {float(logged):.6f} but "
                             f"outer/loss implies {derived:.6f} for {algorithm!r} with support_weight "
                             f"{support_weight}: a log of another algorithm or weight?")
        out.append(float(logged) if logged is not None else derived)
    return out


def within_task_transfer(rows: Sequence[Mapping], *, algorithm: str = "maml", support_weight: float = 0.0,
                         from_step: int = 0) -> Transfer:
    """How much of the inner loop's drop in support loss reaches the same task's query items.

    An episode draws its support and query items alike, so the support loss before adaptation
    (``inner/loss_pre``) estimates the query loss before it; ``inner/loss_pre - outer/query_loss``
    is then what adapting on the support items gained on held-out queries of the same tools. MAML
    has something to exploit only where that gain is a good part of ``inner/loss_pre -
    inner/loss_post`` (BUILD_NOTES.md, session 22). For pooled FT, which does not adapt, the same
    difference checks the estimate (it should be ~0).

    Args:
      rows: ``metrics.jsonl`` rows (:func:`read_metrics`).
      algorithm, support_weight: the run's ``meta.algorithm`` / ``meta.support_weight``, for logs
        without ``outer/query_loss`` (see :func:`query_losses`).
      from_step: ignore rows before this step (e.g. the warm-up).

    Raises:
      ValueError: no row at or after ``from_step``, or a row lacks a needed key (named).
    """
    rows = [r for r in rows if int(r.get("step", 0)) >= from_step]
    if not rows:
        raise ValueError(f"no metrics rows at or after step {from_step}")
    for r in rows:
        missing = [k for k in ("inner/loss_pre", "inner/loss_post") if k not in r]
        if missing:
            raise ValueError(f"metrics row of step {r.get('step')} has no {missing}")
    pre = np.array([float(r["inner/loss_pre"]) for r in rows])
    post = np.array([float(r["inner/loss_post"]) for r in rows])
    query = np.array(query_losses(rows, algorithm, support_weight))
    gain = pre - query
    sem = float(np.std(gain, ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("nan")
    return Transfer(len(rows), float(pre.mean()), float(post.mean()), float(query.mean()), sem)


class Progress:
    """``step/total  [#####.....]  loss  ETA`` on stderr, rewritten in place (or plain lines when not a TTY)."""

    def __init__(self, total: int, start: int = 0, width: int = 24, stream=sys.stderr):
        self.total, self.start, self.width, self.stream = total, start, width, stream
        self.t0 = time.perf_counter()

    def update(self, step: int, text: str = "") -> None:
        done = max(step - self.start, 1e-9)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step)
        frac = step / max(self.total, 1)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"{step:>6}/{self.total} [{bar}] {text} ETA {eta:5.0f}s"
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.stream.write(("\r" + line) if tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
