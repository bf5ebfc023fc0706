"""Normalized loaders: a tiny synthetic dataset, and every bad-input case names file, line and field."""
import json
import logging
import pathlib

import pytest

from mta_jax.data import records

TOOLS = [
    {"tool_id": "a", "name": "alpha", "description": "does a", "parameters": None, "category": "x/1"},
    {"tool_id": "b", "name": "beta", "description": "does b", "parameters": {"p": 1}, "category": "y",
     "doc_text": "beta doc"},
    {"tool_id": "c", "name": "gamma", "description": "", "parameters": None, "category": None},
]
RECS = [
    {"id": "q0", "query": "use a", "gold": ["a"], "candidates": None, "meta": {}},
    {"id": "q1", "query": "use b or c", "gold": ["b", "c"], "candidates": ["a", "b", "c"], "meta": {"k": 1}},
    {"id": "q2", "query": "nothing", "gold": [], "candidates": None, "meta": {}},
]


def _write(path: pathlib.Path, objs) -> pathlib.Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), "utf-8")
    return path


@pytest.fixture
def ds(tmp_path):
    _write(tmp_path / "tools.jsonl", TOOLS)
    _write(tmp_path / "train.jsonl", RECS)
    _write(tmp_path / "test.jsonl", RECS[:1])
    return tmp_path


def test_load_normalized_dir(ds):
    cat, splits = records.load_normalized_dir(ds)
    assert cat.ids() == ["a", "b", "c"] and len(cat) == 3 and "b" in cat and "z" not in cat
    assert cat.index("c") == 2 and cat["b"].name == "beta" and cat["b"].extras["doc_text"] == "beta doc"
    assert cat.domain("a") == "x" and cat.domain("b") == "y" and cat.domain("c") is None
    assert sorted(splits) == ["test", "train"]
    r = splits["train"][1]
    assert (r.id, r.gold, r.candidates, r.meta["k"]) == ("q1", ("b", "c"), ("a", "b", "c"), 1)
    assert splits["train"][2].gold == () and splits["train"][0].candidates is None
    with pytest.raises(KeyError, match="'zz'"):
        cat.index("zz")


def _bad_tools(tmp_path, line):
    return _write(tmp_path / "tools.jsonl", [TOOLS[0], line])


@pytest.mark.parametrize("line, field, msg", [
    ('{"tool_id": "b", "name": "b"', None, "malformed JSON"),
    ({"tool_id": "a", "name": "x", "description": "d"}, "tool_id", "duplicate tool_id"),
    ({"name": "x", "description": "d"}, "tool_id", "missing field"),
    ({"tool_id": "b", "name": "  ", "description": "d"}, "name", "empty text"),
    ({"tool_id": "b", "name": "x"}, "description", "missing field"),
    ({"tool_id": "b", "name": "x", "description": 3}, "description", "expected a string"),
    ('[1, 2]', None, "expected a JSON object"),
])
def test_bad_tools(tmp_path, line, field, msg):
    path = _bad_tools(tmp_path, line)
    with pytest.raises(records.DataError) as e:
        records.load_catalogue(path)
    text = str(e.value)
    assert "tools.jsonl:2" in text and msg in text
    if field:
        assert f"field {field!r}" in text


def test_non_utf8(tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_bytes(json.dumps(TOOLS[0]).encode() + b"\n" + b'{"tool_id": "\xff\xfe"}\n')
    with pytest.raises(records.DataError, match=r"tools.jsonl:2: not valid UTF-8"):
        records.load_catalogue(path)


@pytest.mark.parametrize("rec, field, msg", [
    ({"id": "x", "query": "q", "gold": ["zz"], "candidates": None}, "gold", "unknown tool_id 'zz'"),
    ({"id": "x", "query": "q", "gold": ["a"], "candidates": ["a", "nope"]}, "candidates", "unknown tool_id 'nope'"),
    ({"id": "x", "query": "", "gold": ["a"], "candidates": None}, "query", "empty text"),
    ({"id": "x", "query": "q", "candidates": None}, "gold", "missing field"),
    ({"id": "x", "query": "q", "gold": "a", "candidates": None}, "gold", "expected a list"),
    ({"id": "q0", "query": "q", "gold": ["a"], "candidates": None}, "id", "duplicate id"),
    ({"query": "q", "gold": ["a"], "candidates": None}, "id", "missing field"),
    ({"id": "x", "query": "q", "gold": ["a"], "candidates": []}, "candidates", "none of the gold tools"),
    ({"id": "x", "query": "q", "gold": ["a"], "candidates": ["b"]}, "candidates", "none of the gold tools"),
    ({"id": "x", "query": "q", "gold": ["a"], "candidates": None, "meta": []}, "meta", "expected an object"),
    ({"id": "x", "query": "q", "gold": ["a"], "candidates": None, "meta": ""}, "meta", "expected an object"),
])
def test_bad_records_raise_and_skip(tmp_path, caplog, rec, field, msg):
    cat = records.load_catalogue(_write(tmp_path / "tools.jsonl", TOOLS))
    path = _write(tmp_path / "s.jsonl", [RECS[0], rec, RECS[1]])
    with pytest.raises(records.DataError) as e:
        records.load_records(path, cat)
    assert "s.jsonl:2" in str(e.value) and f"field {field!r}" in str(e.value) and msg in str(e.value)
    with caplog.at_level(logging.WARNING, logger="mta_jax.data.records"):
        kept = records.load_records(path, cat, skip_invalid=True)
    assert [r.id for r in kept] == ["q0", "q1"]
    assert "skipped 1 invalid record(s), kept 2" in caplog.text and "s.jsonl:2" in caplog.text


def test_empty_candidates_are_fine_where_there_is_nothing_to_choose(tmp_path):
    cat = records.load_catalogue(_write(tmp_path / "tools.jsonl", TOOLS))
    path = _write(tmp_path / "s.jsonl", [{"id": "x", "query": "q", "gold": [], "candidates": [], "meta": None}])
    (rec,) = records.load_records(path, cat)
    assert rec.candidates == () and rec.gold == () and dict(rec.meta) == {}


def test_skip_invalid_survives_malformed_json(tmp_path, caplog):
    cat = records.load_catalogue(_write(tmp_path / "tools.jsonl", TOOLS))
    path = _write(tmp_path / "s.jsonl", [RECS[0], "{oops", RECS[1]])
    with caplog.at_level(logging.WARNING):
        assert [r.id for r in records.load_records(path, cat, skip_invalid=True)] == ["q0", "q1"]
    assert "s.jsonl:2: malformed JSON" in caplog.text


def test_normalized_dir_without_tools(tmp_path):
    with pytest.raises(records.DataError, match="no tools.jsonl"):
        records.load_normalized_dir(tmp_path)


def test_resolve_data_dir(tmp_path, monkeypatch):
    (tmp_path / "d" / "normalized").mkdir(parents=True)
    assert records.resolve_data_dir(tmp_path / "d") == tmp_path / "d"
    monkeypatch.setenv("MTA_DATA_DIR", str(tmp_path / "d"))
    assert records.resolve_data_dir() == tmp_path / "d"
    monkeypatch.delenv("MTA_DATA_DIR")
    monkeypatch.setenv("MTA_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="MTA_DATA_DIR"):
        records.resolve_data_dir()
    with pytest.raises(FileNotFoundError, match="explicit data_dir"):
        records.resolve_data_dir(tmp_path / "nowhere")
