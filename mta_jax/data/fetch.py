"""Downloads the benchmarks' raw files at pinned commits into a cache and writes the normalized JSONL copies.

Run ``python -m mta_jax.data.fetch [dataset ...]``. Never called implicitly: loaders only read
``resolve_data_dir()``. Offline, it fails fast (short timeout) and says how to point at local data.
"""
from __future__ import annotations

import json
import pathlib
import sys
import urllib.error
import urllib.request
from typing import Mapping, Sequence

from mta_jax.data import raw as raw_lib
from mta_jax.data import records

_GH = "https://raw.githubusercontent.com"
# (url prefix at the pinned commit, files relative to it) per dataset: the data README §2 commits,
# restricted to the files the raw parsers read.
SOURCES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "metatool": (f"{_GH}/HowieHwong/MetaTool/35e81bb7576826e980c80fed8f8c0a2b4a1e6fbb/dataset",
                 ("plugin_des.json", "big_tool_des.json", "data/all_clean_data.csv",
                  "data/multi_tool_query_golden.json")),
    "toollens": (f"{_GH}/quchangle1/COLT/bbec292c38cabe3fbae098f50cc31b2e9f7e8fca/datasets/ToolLens",
                 ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")),
    "bfcl": (f"{_GH}/ShishirPatil/gorilla/f7cf7359b7ac615a0b294831c5ba2bc95ee4a000/"
             "berkeley-function-call-leaderboard/bfcl_eval/data",
             tuple(f"BFCL_v4_{c}.json" for c in raw_lib.BFCL_CATEGORIES)
             + tuple(f"possible_answer/BFCL_v4_{c}.json" for c in raw_lib.BFCL_CATEGORIES
                     if "irrelevance" not in c and c != "live_relevance")),
    "seal_tools": (f"{_GH}/fairyshine/Seal-Tools/ce753ecd60ed08dd376984035de531ab8421f1c6/Seal-Tools_Dataset",
                   ("tool.jsonl", "dev.jsonl", "test_in_domain.jsonl", "dataset_for_finetune/dev.json",
                    "dataset_for_finetune/test_in_domain.json")),
    "api_bank": (f"{_GH}/AlibabaResearch/DAMO-ConvAI/1d76900822d9ecfcd6e9eb0ca64a073cb892b735/api-bank",
                 ("test-data/level-1-api.json",)),
}
TIMEOUT_S = 10.0
OFFLINE_HINT = ("cannot reach {url} ({err}). This machine looks offline: pass --data_dir (or set MTA_DATA_DIR) "
                "to a folder holding normalized/ and protocol/, e.g. a copy of shared/data.")


def _download(url: str, dest: pathlib.Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            body = r.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ConnectionError(OFFLINE_HINT.format(url=url, err=e)) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(body)
    tmp.replace(dest)


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
        prefix, files = SOURCES[name]
        for rel in files:
            dest = root / "raw" / name / rel
            if not dest.is_file():
                _download(f"{prefix}/{rel}", dest)
        write_normalized(root / "normalized" / name, *raw_lib.parse_raw(root, name))
    return root


if __name__ == "__main__":
    print(fetch(sys.argv[1:] or tuple(SOURCES)))
