"""Eval sets: the fixed unseen-tool protocol files, the shipped-candidate benchmarks and any normalized dir.

An :class:`EvalSet` is one list of items scored against one catalogue. A *group* is the tuple of
sets reported as one row: the five seed files of a protocol set (mean ± std over seeds), or a
single set. :data:`BUILTIN_SETS` maps every built-in set name to its builder; see
``shared/data/README.md`` §4–5 for the protocol these builders follow.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from typing import Callable, Sequence

from mta_jax.data.records import Catalogue, load_catalogue, load_normalized_dir, load_records
from mta_jax.data.records import resolve_data_dir
from mta_jax.tasks.protocol import load_protocol_items, load_source_records

PROTOCOL_SEEDS = (0, 1, 2, 3, 4)
# README §2/§5: the authentication step is a fixed preamble of every API-Bank dialogue, not a
# tool-selection decision, so the protocol drops it (82 of 399 level-1 items).
API_BANK_EXCLUDED_GOLD = ("GetUserToken",)


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One query to score.

    Attributes:
      id: item id (unique within its set).
      query: the query text.
      gold: acceptable tools (any one counts as correct); never empty.
      candidates: the tool ids shown, or None for the whole catalogue (in catalogue order).
    """

    id: str
    query: str
    gold: tuple[str, ...]
    candidates: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A list of items scored against one catalogue.

    Attributes:
      name: the set's report name (e.g. ``metatool/test_sd``); seeds of a group share it.
      dataset: the dataset the catalogue belongs to (``metatool``, ``bfcl``, ...).
      catalogue: the tool catalogue the item ids refer to.
      items: the items (gold never empty).
      seed: protocol seed, or None for sets without seeds.
      skipped_empty_gold: records of the source file left out because their gold was empty.
      total_items: the number of items the set had before :func:`subsample` kept ``items`` of
        them; None when it holds them all.
    """

    name: str
    dataset: str
    catalogue: Catalogue
    items: tuple[EvalItem, ...]
    seed: int | None = None
    skipped_empty_gold: int = 0
    total_items: int | None = None

    @property
    def label(self) -> str:
        """``name`` plus the seed, for messages."""
        return self.name if self.seed is None else f"{self.name}[seed {self.seed}]"


Group = tuple[EvalSet, ...]


def _check_ids(name: str, catalogue: Catalogue, items: Sequence[EvalItem]) -> None:
    known = set(catalogue.ids())
    for it in items:
        for field, ids in (("gold", it.gold), ("candidates", it.candidates or ())):
            bad = [t for t in ids if t not in known]
            if bad:
                raise ValueError(f"{name}: item {it.id!r} field {field!r} names tools absent "
                                 f"from the catalogue: {bad[:3]}")


def protocol_group(data_dir: pathlib.Path, dataset: str, split: str, regime: str,
                   seeds: Sequence[int] = PROTOCOL_SEEDS) -> Group:
    """The seed files ``protocol/<dataset>/<split>_<regime>_seed<s>.jsonl`` as one group.

    Args:
      data_dir: the data root (with ``normalized/`` and ``protocol/``).
      dataset: ``metatool`` or ``toollens``.
      split: ``val`` or ``test``.
      regime: ``sd`` (same-domain distractors) or ``cd`` (cross-domain).
      seeds: which seed files to read.
    """
    # The source records are read once per group, not once per seed file.
    catalogue, source = load_source_records(data_dir, dataset)
    name = f"{dataset}/{split}_{regime}"
    sets = []
    for seed in seeds:
        items = tuple(EvalItem(p.id, p.query, (p.gold,), tuple(p.candidates))
                      for p in load_protocol_items(data_dir, dataset, split, regime, seed, source=source))
        if not items:
            raise ValueError(f"{name} seed {seed}: protocol file has no items")
        _check_ids(f"{name}[seed {seed}]", catalogue, items)
        sets.append(EvalSet(name, dataset, catalogue, items, seed=seed))
    return tuple(sets)


def _from_records(name: str, dataset: str, catalogue: Catalogue, records,
                  exclude_gold: Sequence[str] = ()) -> EvalSet:
    items, skipped = [], 0
    excluded = tuple(exclude_gold)
    for r in records:
        gold = tuple(r.gold)
        if not gold:
            skipped += 1  # README §1: empty gold = "no tool"; not part of the top-1 metric
            continue
        if excluded and all(g in excluded for g in gold):
            continue
        cands = None if r.candidates is None else tuple(r.candidates)
        items.append(EvalItem(r.id, r.query, gold, cands))
    _check_ids(name, catalogue, items)
    return EvalSet(name, dataset, catalogue, tuple(items), skipped_empty_gold=skipped)


def shipped_group(data_dir: pathlib.Path, dataset: str, split: str,
                  exclude_gold: Sequence[str] = ()) -> Group:
    """``normalized/<dataset>/<split>.jsonl`` with its shipped candidate lists, as a 1-set group.

    Args:
      exclude_gold: items whose gold tools all lie in this list are dropped (API-Bank's
        ``GetUserToken``, README §5).
    """
    base = pathlib.Path(data_dir) / "normalized" / dataset
    catalogue = load_catalogue(base / "tools.jsonl")
    records = load_records(base / f"{split}.jsonl", catalogue)
    s = _from_records(f"{dataset}/{split}", dataset, catalogue, records, exclude_gold)
    if not s.items:
        raise ValueError(f"{base / f'{split}.jsonl'}: no item with a gold tool")
    return (s,)


def normalized_dir_groups(path: str | pathlib.Path) -> dict[str, Group]:
    """One group ``<dir basename>/<split>`` per split file of a normalized-format folder.

    ``candidates: null`` items are scored over the whole pool; records with empty gold are skipped
    and counted in ``skipped_empty_gold``. A split with no gold at all (e.g. BFCL irrelevance)
    yields no set and is logged as a warning.
    """
    path = pathlib.Path(path)
    catalogue, splits = load_normalized_dir(path)
    out: dict[str, Group] = {}
    for split in sorted(splits):
        name = f"{path.name}/{split}"
        s = _from_records(name, path.name, catalogue, splits[split])
        if not s.items:
            logging.warning("%s: all %d records have empty gold; no eval set built",
                            path / f"{split}.jsonl", s.skipped_empty_gold)
            continue
        out[name] = (s,)
    return out


Builder = Callable[[pathlib.Path, Sequence[int]], Group]  # (data root, protocol seeds) -> group


def _protocol(dataset: str, split: str, regime: str) -> Builder:
    return lambda d, seeds: protocol_group(d, dataset, split, regime, seeds)


def _shipped(dataset: str, split: str, exclude_gold: Sequence[str] = ()) -> Builder:
    return lambda d, seeds: shipped_group(d, dataset, split, exclude_gold)


BUILTIN_SETS: dict[str, Builder] = {
    **{f"{ds}/{sp}_{rg}": _protocol(ds, sp, rg)
       for ds in ("metatool", "toollens") for sp in ("test", "val") for rg in ("sd", "cd")},
    "bfcl/multiple": _shipped("bfcl", "multiple"),
    "bfcl/live_multiple": _shipped("bfcl", "live_multiple"),
    "seal_tools/dev": _shipped("seal_tools", "dev"),
    "seal_tools/test_in_domain": _shipped("seal_tools", "test_in_domain"),
    "api_bank/level-1": _shipped("api_bank", "level-1", API_BANK_EXCLUDED_GOLD),
}

# The sets of the paper-style results table (val_* sets are for model selection only).
TEST_SETS = ("metatool/test_sd", "metatool/test_cd", "toollens/test_sd", "toollens/test_cd",
             "bfcl/multiple", "bfcl/live_multiple", "seal_tools/test_in_domain",
             "api_bank/level-1")


def subsample(eval_set: EvalSet, max_items: int) -> EvalSet:
    """The set with at most ``max_items`` of its items: a uniform random subset, kept in file order.

    Items are ranked by a hash (BLAKE2b) of ``"<set name>|<item id>"`` and the ``max_items`` lowest
    kept, so the subset depends only on the set's name and item ids: every method, process and
    machine scores the same items, a larger ``max_items`` keeps a superset of a smaller one's, and
    the five protocol seed files of a MetaTool / ToolLens set (the same queries with other
    distractors) keep the same queries — their std still measures the distractors alone. A set with
    no more than ``max_items`` items is returned unchanged; otherwise ``total_items`` records its full
    size (``n_total`` in ``results.json``).

    Raises:
      ValueError: ``max_items`` < 1.
    """
    if max_items < 1:
        raise ValueError(f"{eval_set.label}: max_items must be >= 1, got {max_items}")
    n = len(eval_set.items)
    if n <= max_items:
        return eval_set

    def rank(i: int) -> tuple[bytes, int]:
        key = f"{eval_set.name}|{eval_set.items[i].id}".encode()
        return hashlib.blake2b(key, digest_size=8).digest(), i

    keep = sorted(sorted(range(n), key=rank)[:max_items])
    return dataclasses.replace(eval_set, items=tuple(eval_set.items[i] for i in keep), total_items=n)


@dataclasses.dataclass(frozen=True)
class Options:
    """How much of each eval set to read (``config.eval.protocol_seeds`` / ``config.eval.max_items``).

    Attributes:
      protocol_seeds: the MetaTool / ToolLens seed files a protocol row averages.
      max_items: score at most this many items of every set (each seed file of a protocol row, each
        shipped or folder set) — a uniform, deterministic subset (:func:`subsample`); 0 scores all.
        For models that score one prompt per item on a CPU (decoders); the row then reports
        ``n`` of ``n_total`` items and its accuracy carries the subset's sampling error.
    """

    protocol_seeds: tuple[int, ...] = PROTOCOL_SEEDS
    max_items: int = 0

    @classmethod
    def from_config(cls, eval_config) -> "Options":
        """Reads ``protocol_seeds`` and ``max_items`` of a ``config.eval`` section (both optional).

        Raises:
          ValueError: ``max_items`` < 0 (naming the config field).
        """
        seeds = tuple(int(x) for x in eval_config.get("protocol_seeds", PROTOCOL_SEEDS))
        max_items = int(eval_config.get("max_items", 0) or 0)
        if max_items < 0:
            raise ValueError(f"config.eval.max_items must be >= 0 (0 = every item), got {max_items}")
        return cls(protocol_seeds=seeds, max_items=max_items)


def build_sets(names: Sequence[str], data_dir: str | pathlib.Path | None = None,
               seeds: Sequence[int] = PROTOCOL_SEEDS, max_items: int = 0) -> dict[str, Group]:
    """Builds the named groups: built-in names or paths of normalized-format folders.

    Args:
      names: each either a key of :data:`BUILTIN_SETS` or an existing directory (which expands
        to one group per split file, see :func:`normalized_dir_groups`).
      data_dir: data root for built-in sets (default: :func:`resolve_data_dir`).
      seeds: the protocol seed files a MetaTool / ToolLens set reads (default all five; fewer
        make a cheaper, noisier estimate, e.g. for a large decoder on a CPU).
      max_items: if > 0, every set keeps at most this many items (:func:`subsample`).

    Raises:
      KeyError: a name is neither built in nor a directory (lists the built-in names).
      ValueError: ``seeds`` is empty or names a seed outside :data:`PROTOCOL_SEEDS`.
    """
    bad = sorted(set(seeds) - set(PROTOCOL_SEEDS))
    if not seeds or bad:
        raise ValueError(f"protocol seeds {list(seeds)}: choose a non-empty subset of {list(PROTOCOL_SEEDS)}")
    root = resolve_data_dir(data_dir)
    out: dict[str, Group] = {}
    for name in names:
        if name in BUILTIN_SETS:
            out[name] = BUILTIN_SETS[name](root, tuple(seeds))
        elif pathlib.Path(name).is_dir():
            out.update(normalized_dir_groups(name))
        else:
            raise KeyError(f"unknown eval set {name!r}: not a directory and not one of "
                           f"{sorted(BUILTIN_SETS)}")
    if max_items:
        out = {name: tuple(subsample(s, max_items) for s in group) for name, group in out.items()}
    return out
