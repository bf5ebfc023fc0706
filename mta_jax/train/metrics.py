"""Metric logging: ``metrics.jsonl`` (one object per log step) and a one-line progress bar with ETA."""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Mapping

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
