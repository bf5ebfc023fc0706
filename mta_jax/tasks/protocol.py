"""The fixed unseen-tool protocol of the data README (§4): tool splits, protocol items and candidate sampling."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import zlib
from typing import Sequence

import numpy as np

from mta_jax.data import records

PROTOCOL_DATASETS = ("metatool", "toollens")
SPLITS = ("train", "val", "test")
REGIMES = {"sd": 0, "cd": 1}  # r_idx of the README's rng seeding
SEEDS = (0, 1, 2, 3, 4)
NUM_CANDIDATES = 5


def tool_split(dataset: str, tool_id: str) -> str:
    """The README's hash rule: ``sha256(f"{dataset}:{tool_id}") % 100`` < 20 test, < 30 val, else train."""
    h = int(hashlib.sha256(f"{dataset}:{tool_id}".encode("utf-8")).hexdigest(), 16) % 100
    return "test" if h < 20 else "val" if h < 30 else "train"


@dataclasses.dataclass(frozen=True)
class ProtocolItem:
    """One (query, gold tool) pair; ``excluded`` = the record's other gold tools (never distractors)."""

    id: str
    query: str
    gold: str
    candidates: tuple[str, ...] | None
    excluded: tuple[str, ...]


# Query records the protocol is built from (README §4: "How items are built").
SOURCE_SPLITS = {"metatool": ("single_tool",), "toollens": ("train", "test")}


def build_items(dataset: str, recs: Sequence[records.QueryRecord]) -> dict[str, list[ProtocolItem]]:
    """Rebuilds the protocol items from query records, grouped by the split of their gold tool.

    One item per (record, gold tool), id ``f"{record.id}::{gold}"``, ``excluded`` = the record's other
    gold tools; identical (query, gold) pairs merge (first kept, ``excluded`` unioned); empty gold skipped.
    """
    first: dict[tuple[str, str], int] = {}
    items: list[ProtocolItem] = []
    for r in recs:
        for g in r.gold:
            excl = tuple(x for x in r.gold if x != g)
            key = (r.query, g)
            if key in first:
                old = items[first[key]]
                merged = old.excluded + tuple(x for x in excl if x not in old.excluded)
                items[first[key]] = dataclasses.replace(old, excluded=merged)
                continue
            first[key] = len(items)
            items.append(ProtocolItem(f"{r.id}::{g}", r.query, g, None, excl))
    out: dict[str, list[ProtocolItem]] = {s: [] for s in SPLITS}
    for it in items:
        out[tool_split(dataset, it.gold)].append(it)
    return out


def load_source_records(data_dir, dataset: str) -> tuple[records.Catalogue, list[records.QueryRecord]]:
    """The catalogue and the (pooled) normalized query records the protocol of ``dataset`` is built from."""
    _protocol_dir(data_dir, dataset)
    norm = pathlib.Path(data_dir) / "normalized" / dataset
    cat = records.load_catalogue(norm / records.TOOLS_FILE)
    recs = [r for s in SOURCE_SPLITS[dataset] for r in records.load_records(norm / f"{s}.jsonl", cat)]
    return cat, recs


def _protocol_dir(data_dir, dataset: str) -> pathlib.Path:
    if dataset not in PROTOCOL_DATASETS:
        raise ValueError(f"no fixed protocol for dataset {dataset!r}; have {PROTOCOL_DATASETS}")
    d = pathlib.Path(data_dir) / "protocol" / dataset
    if not d.is_dir():
        raise FileNotFoundError(f"protocol folder {d} not found (is data_dir={data_dir} the shared data root?)")
    return d


def _item(obj: dict, path, line: int, with_candidates: bool) -> ProtocolItem:
    rid = records.require_text(obj, "id", path, line)
    query = records.require_text(obj, "query", path, line)
    gold = records.require_text(obj, "gold", path, line)
    field = "candidates" if with_candidates else "excluded"
    if field not in obj:
        raise records.DataError(f"{records.where(path, line, field)}: missing field")
    v = obj[field]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise records.DataError(f"{records.where(path, line, field)}: expected a list of tool_id strings")
    if with_candidates:
        if gold not in v or len(set(v)) != len(v):
            raise records.DataError(f"{records.where(path, line, field)}: gold {gold!r} must appear exactly once "
                                    "among distinct candidates")
        return ProtocolItem(rid, query, gold, tuple(v), ())
    return ProtocolItem(rid, query, gold, None, tuple(v))


def _read_items(path: pathlib.Path, with_candidates: bool) -> list[ProtocolItem]:
    items = [_item(obj, path, n, with_candidates) for n, obj in records.iter_jsonl(path)]
    if not items:
        raise records.DataError(f"{path}: no items")
    return items


def load_splits(data_dir, dataset: str) -> dict[str, str]:
    """Reads ``protocol/<dataset>/splits.json`` (``{tool_id: split}``)."""
    path = _protocol_dir(data_dir, dataset) / "splits.json"
    try:
        splits = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise records.DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(splits, dict):
        raise records.DataError(f"{path}: expected an object {{tool_id: split}}, got {type(splits).__name__}")
    bad = {k: v for k, v in splits.items() if v not in SPLITS}
    if bad:
        raise records.DataError(f"{path}: unknown split value(s) {dict(list(bad.items())[:3])}")
    return splits


def load_train_items(data_dir, dataset: str) -> list[ProtocolItem]:
    """Reads ``train_items.jsonl``: items whose gold is a train tool; ``candidates`` is ``None``."""
    return _read_items(_protocol_dir(data_dir, dataset) / "train_items.jsonl", with_candidates=False)


def load_protocol_items(data_dir, dataset: str, split: str, regime: str, seed: int,
                        *, source: Sequence[records.QueryRecord] | None = None) -> list[ProtocolItem]:
    """Reads one fixed evaluation file ``{split}_{regime}_seed{seed}.jsonl`` (5 candidates per item).

    The files are the yardstick: they are read, never regenerated (data README §4). They do not store
    ``excluded``; it is filled in from the normalized source records (``source``, or loaded here).
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r} (train items: load_train_items)")
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {tuple(REGIMES)}, got {regime!r}")
    if seed not in SEEDS:
        raise ValueError(f"protocol seeds are {SEEDS}, got {seed!r}")
    path = _protocol_dir(data_dir, dataset) / f"{split}_{regime}_seed{seed}.jsonl"
    items = _read_items(path, with_candidates=True)
    if source is None:
        source = load_source_records(data_dir, dataset)[1]
    rebuilt = {it.id: it for it in build_items(dataset, source)[split]}
    out = []
    for n, it in enumerate(items, start=1):
        if it.id not in rebuilt:
            raise records.DataError(f"{records.where(path, n, 'id')}: item {it.id!r} has no {split} source "
                                    f"record in normalized/{dataset}")
        want = rebuilt[it.id]
        for field in ("gold", "query"):
            if getattr(it, field) != getattr(want, field):
                raise records.DataError(f"{records.where(path, n, field)}: {getattr(it, field)!r} disagrees with "
                                        f"item {it.id!r} of normalized/{dataset} ({getattr(want, field)!r})")
        out.append(dataclasses.replace(it, excluded=want.excluded))
    return out


def sample_candidates(item_id: str, gold: str, excluded: Sequence[str], catalogue: records.Catalogue,
                      regime: str, seed: int, k: int = 4) -> tuple[str, ...]:
    """Draws ``gold`` + ``k`` distractors exactly as the README's algorithm (bit-for-bit with its files).

    Args:
      item_id: the protocol item id (``f"{record id}::{gold}"``); seeds the generator via crc32.
      gold: the gold tool id.
      excluded: the record's other gold tools (never distractors).
      catalogue: the whole dataset catalogue (all splits: seen tools are valid distractors).
      regime: ``"sd"`` (same domain as gold, topped up from other domains) or ``"cd"``.
      seed: protocol seed.
      k: number of distractors.

    Returns:
      ``k + 1`` tool ids with the gold at a uniformly drawn position.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {tuple(REGIMES)}, got {regime!r}")
    rng = np.random.default_rng([seed, REGIMES[regime], zlib.crc32(item_id.encode("utf-8"))])
    drop = set(excluded) | {gold}
    eligible = sorted(t for t in catalogue.ids() if t not in drop)
    if regime == "cd":
        distractors = [eligible[i] for i in rng.choice(len(eligible), k, replace=False)]
    else:
        g_dom = catalogue.domain(gold)
        # A gold tool without category has "the whole pool" as its domain (README §4).
        dom = eligible if g_dom is None else [t for t in eligible if catalogue.domain(t) == g_dom]
        if len(dom) >= k:
            distractors = [dom[i] for i in rng.choice(len(dom), k, replace=False)]
        else:  # the README's top-up: all same-domain tools, then the rest from other domains
            rest = [t for t in eligible if catalogue.domain(t) != g_dom]
            distractors = dom + [rest[i] for i in rng.choice(len(rest), k - len(dom), replace=False)]
    pos = int(rng.integers(0, k + 1))
    return tuple(distractors[:pos] + [gold] + distractors[pos:])
