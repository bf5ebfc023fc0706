"""Tool catalogues and query records in the common normalized JSONL format, with strict, located validation."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import types
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

TOOLS_FILE = "tools.jsonl"
_TOOL_CORE = ("tool_id", "name", "description", "parameters", "category")


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Formats a location ``file:line field 'x'`` for error messages."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f" field {field!r}"
    return loc


@dataclasses.dataclass(frozen=True)
class Tool:
    """One selectable tool.

    Attributes:
      tool_id: unique inside its dataset (not across datasets).
      name: the name a model would output (BFCL: the function name; ToolLens: the endpoint name).
      description: natural-language description.
      parameters: JSON-like parameter schema or ``None``.
      domain: the full ``category`` string (``None`` when the dataset has none).
      extras: any dataset-specific fields (ToolLens ``tool_name``/``doc_text``, ...), read-only.
    """

    tool_id: str
    name: str
    description: str
    parameters: Any = None
    domain: str | None = None
    extras: Mapping = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))


@dataclasses.dataclass(frozen=True)
class QueryRecord:
    """One query with its gold tools (``()`` = no tool applies) and optional shipped candidate list."""

    id: str
    query: str
    gold: tuple[str, ...]
    candidates: tuple[str, ...] | None = None
    meta: Mapping = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))


class Catalogue:
    """An immutable, ordered (file order) collection of tools with unique ids."""

    def __init__(self, tools, source: str = "<memory>"):
        self.tools: tuple[Tool, ...] = tuple(tools)
        index: dict[str, int] = {}
        for i, t in enumerate(self.tools):
            if t.tool_id in index:
                raise DataError(f"{source}: duplicate tool_id {t.tool_id!r} (entries {index[t.tool_id]} and {i})")
            index[t.tool_id] = i
        self._index = types.MappingProxyType(index)
        self.source = source

    def index(self, tool_id: str) -> int:
        """Position of ``tool_id`` in file order; ``KeyError`` naming the catalogue if unknown."""
        try:
            return self._index[tool_id]
        except KeyError:
            raise KeyError(f"unknown tool_id {tool_id!r} in catalogue {self.source}") from None

    def __getitem__(self, tool_id: str) -> Tool:
        return self.tools[self.index(tool_id)]

    def __len__(self) -> int:
        return len(self.tools)

    def __contains__(self, tool_id) -> bool:
        return tool_id in self._index

    def __iter__(self) -> Iterator[Tool]:
        return iter(self.tools)

    def ids(self) -> list[str]:
        """Tool ids in file order."""
        return [t.tool_id for t in self.tools]

    def domain(self, tool_id: str) -> str | None:
        """The tool's domain: its category up to the first ``/`` (data README §4), or ``None``."""
        cat = self[tool_id].domain
        return None if cat is None else cat.split("/", 1)[0]

    def __repr__(self) -> str:
        return f"Catalogue({len(self)} tools from {self.source})"


def _parse_lines(path: pathlib.Path) -> Iterator[tuple[int, dict | None, DataError | None]]:
    """Yields ``(line, object, None)`` or ``(line, None, error)``; never raises mid-file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, DataError(f"{where(path, n)}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, None, DataError(f"{where(path, n)}: malformed JSON ({e.msg}, column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield n, None, DataError(f"{where(path, n)}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield n, obj, None


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yields ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises:
      DataError: a line is not UTF-8, not JSON, or not a JSON object (message names file and line).
    """
    for n, obj, err in _parse_lines(pathlib.Path(path)):
        if err is not None:
            raise err
        yield n, obj


def require_text(obj: Mapping, field: str, loc_path, line: int | None, allow_empty: bool = False) -> str:
    """Returns ``obj[field]`` as a string, raising a located :class:`DataError` if missing/empty/not str."""
    if field not in obj:
        raise DataError(f"{where(loc_path, line, field)}: missing field")
    v = obj[field]
    if not isinstance(v, str):
        raise DataError(f"{where(loc_path, line, field)}: expected a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where(loc_path, line, field)}: empty text")
    return v


def tool_from_obj(obj: Mapping, path, line: int | None) -> Tool:
    """Validates one normalized tool object (see data README §1) into a :class:`Tool`."""
    tool_id = require_text(obj, "tool_id", path, line)
    name = require_text(obj, "name", path, line)
    # API-Bank's undocumented lv3-train APIs have ``description: null``: the field must be present, and
    # null reads as "" (the name still identifies the tool; render.tool_text then shows the name alone).
    if "description" not in obj:
        raise DataError(f"{where(path, line, 'description')}: missing field")
    description = "" if obj["description"] is None else require_text(obj, "description", path, line, True)
    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        raise DataError(f"{where(path, line, 'category')}: expected a string or null")
    extras = {k: v for k, v in obj.items() if k not in _TOOL_CORE}
    return Tool(tool_id, name, description, obj.get("parameters"), category, types.MappingProxyType(extras))


def load_catalogue(path) -> Catalogue:
    """Reads a normalized ``tools.jsonl``.

    Raises:
      DataError: malformed lines, missing/empty fields or duplicate ``tool_id`` (file + line named).
    """
    path = pathlib.Path(path)
    tools, seen = [], {}
    for n, obj in iter_jsonl(path):
        t = tool_from_obj(obj, path, n)
        if t.tool_id in seen:
            raise DataError(f"{where(path, n, 'tool_id')}: duplicate tool_id {t.tool_id!r} "
                            f"(first at line {seen[t.tool_id]})")
        seen[t.tool_id] = n
        tools.append(t)
    if not tools:
        raise DataError(f"{path}: no tools")
    return Catalogue(tools, source=str(path))


def _id_list(obj: Mapping, field: str, catalogue: Catalogue, path, line: int) -> tuple[str, ...]:
    v = obj[field]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DataError(f"{where(path, line, field)}: expected a list of tool_id strings")
    for x in v:
        if x not in catalogue:
            raise DataError(f"{where(path, line, field)}: unknown tool_id {x!r} (not in {catalogue.source})")
    if len(set(v)) != len(v):
        raise DataError(f"{where(path, line, field)}: duplicate tool_id in list")
    return tuple(v)


def record_from_obj(obj: Mapping, catalogue: Catalogue, path, line: int) -> QueryRecord:
    """Validates one normalized query object against ``catalogue`` into a :class:`QueryRecord`."""
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if "id" not in obj:
        raise DataError(f"{where(path, line, 'id')}: missing field")
    if not isinstance(rid, str) or not rid:
        raise DataError(f"{where(path, line, 'id')}: expected a non-empty string")
    query = require_text(obj, "query", path, line)
    for f in ("gold", "candidates"):
        if f not in obj:
            raise DataError(f"{where(path, line, f)}: missing field")
    gold = _id_list(obj, "gold", catalogue, path, line)
    cands = None if obj["candidates"] is None else _id_list(obj, "candidates", catalogue, path, line)
    if gold and cands is not None and not set(gold) & set(cands):
        # ([] candidates are fine where there is nothing to choose: BFCL's irrelevance records)
        raise DataError(f"{where(path, line, 'candidates')}: none of the gold tools {list(gold)} is among "
                        f"the {len(cands)} candidates, so no answer could be right")
    meta = obj.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise DataError(f"{where(path, line, 'meta')}: expected an object, got {type(meta).__name__}")
    return QueryRecord(rid, query, gold, cands, types.MappingProxyType(meta))


def load_records(path, catalogue: Catalogue, *, skip_invalid: bool = False) -> list[QueryRecord]:
    """Reads a normalized query file, checking every id against ``catalogue``.

    Args:
      path: a ``<split>.jsonl`` file.
      catalogue: the dataset's tools.
      skip_invalid: skip bad lines instead of raising; every skip is logged and the total is
        logged as a warning (the only way anything is dropped).

    Raises:
      DataError: bad line (file, line and field named) unless ``skip_invalid``.
    """
    path = pathlib.Path(path)
    out, skipped, ids = [], 0, {}
    for n, obj, err in _parse_lines(path):
        try:
            if err is not None:
                raise err
            rec = record_from_obj(obj, catalogue, path, n)
            if rec.id in ids:
                raise DataError(f"{where(path, n, 'id')}: duplicate id {rec.id!r} (first at line {ids[rec.id]})")
        except DataError as e:
            if not skip_invalid:
                raise
            skipped += 1
            log.warning("skipping invalid record: %s", e)
            continue
        ids[rec.id] = n
        out.append(rec)
    if skipped:
        log.warning("%s: skipped %d invalid record(s), kept %d", path, skipped, len(out))
    return out


def load_normalized_dir(path) -> tuple[Catalogue, dict[str, list[QueryRecord]]]:
    """Loads ``tools.jsonl`` and every other ``*.jsonl`` (keyed by stem) of one normalized dataset folder."""
    path = pathlib.Path(path)
    if not (path / TOOLS_FILE).is_file():
        raise DataError(f"{path}: no {TOOLS_FILE}")
    cat = load_catalogue(path / TOOLS_FILE)
    splits = {p.stem: load_records(p, cat) for p in sorted(path.glob("*.jsonl")) if p.name != TOOLS_FILE}
    return cat, splits


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> pathlib.Path:
    """Finds the data directory: ``explicit`` > ``$MTA_DATA_DIR`` > the fetch cache.

    The directory must contain ``normalized/``. Nothing is downloaded here: run
    ``python -m mta_jax.data.fetch`` to fill the cache.

    Raises:
      FileNotFoundError: with a message listing what was tried and how to fix it.
    """
    tried = []
    candidates = []
    if explicit is not None:
        candidates.append(("explicit data_dir", pathlib.Path(explicit)))
    elif os.environ.get("MTA_DATA_DIR"):
        candidates.append(("$MTA_DATA_DIR", pathlib.Path(os.environ["MTA_DATA_DIR"])))
    else:
        candidates.append(("fetch cache", cache_dir() / "data"))
    for label, p in candidates:
        if (p / "normalized").is_dir():
            return p
        tried.append(f"{label} = {p}")
    raise FileNotFoundError(
        "no tool-selection data found (" + "; ".join(tried) + " has no normalized/ folder). "
        "Pass --data_dir, set MTA_DATA_DIR, or run `python -m mta_jax.data.fetch` to build the cache.")


def cache_dir() -> pathlib.Path:
    """``$MTA_CACHE`` or ``~/.cache/mta_jax``."""
    return pathlib.Path(os.environ.get("MTA_CACHE") or pathlib.Path.home() / ".cache" / "mta_jax")
