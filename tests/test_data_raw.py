"""Raw public formats parse to exactly the normalized copies (tools, records, order, documented merges)."""
import json

import pytest

from mta_jax.data import raw, records


@pytest.fixture(scope="module", params=sorted(raw.RAW_PARSERS))
def parsed(request, data_dir):
    name = request.param
    return name, raw.parse_raw(data_dir, name), records.load_normalized_dir(data_dir / "normalized" / name)


def _tool_tuple(t):
    return t.tool_id, t.name, t.description, t.parameters, t.domain, dict(t.extras)


def _rec_tuple(r):
    return r.id, r.query, r.gold, r.candidates, dict(r.meta)


def test_raw_matches_normalized(parsed):
    name, (cat, splits), (ncat, nsplits) = parsed
    if name == "api_bank":  # level-1 only: its catalogue is the APIs described in level-1 prompts
        assert set(cat.ids()) < set(ncat.ids()) and len(cat) >= 40
    else:
        assert cat.ids() == ncat.ids()
    for t in cat.tools:
        assert _tool_tuple(t) == _tool_tuple(ncat[t.tool_id])
    for split, recs in splits.items():
        assert len(recs) == len(nsplits[split]), split
        # Every record, not a sample: parsing is fast and a sample would hide order drift.
        assert [_rec_tuple(r) for r in recs] == [_rec_tuple(r) for r in nsplits[split]]


def test_metatool_duplicate_merge(parsed):
    name, (cat, splits), _ = parsed
    if name != "metatool":
        pytest.skip("metatool only")
    merged = [r for r in splits["single_tool"] if r.meta["source_rows"] > 1]
    conflicting = [r for r in merged if r.meta["conflicting_labels"]]
    assert len(conflicting) == 11  # the data README: 11 duplicated queries with conflicting labels
    assert all(len(r.gold) > 1 for r in conflicting)
    assert len(splits["single_tool"]) == 20550


def test_bad_raw_metatool_csv_names_line(tmp_path, data_dir):
    src = data_dir / "raw" / "metatool"
    dst = tmp_path / "raw" / "metatool"
    (dst / "data").mkdir(parents=True)
    for f in ("plugin_des.json", "big_tool_des.json", "data/multi_tool_query_golden.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    (dst / "data" / "all_clean_data.csv").write_text("Query,Tool\nfind papers,ResearchHelper\nhello,NoSuchTool\n")
    with pytest.raises(records.DataError, match=r"all_clean_data.csv:3 field 'Tool': unknown tool_id 'NoSuchTool'"):
        raw.parse_metatool(tmp_path)


def test_bad_raw_toollens_doc(tmp_path):
    d = tmp_path / "raw" / "toollens"
    d.mkdir(parents=True)
    (d / "corpus.jsonl").write_text(json.dumps({"_id": "0", "text": "no structure here"}) + "\n")
    with pytest.raises(records.DataError, match=r"corpus.jsonl:1 field 'text'"):
        raw.parse_toollens(tmp_path)


def test_unknown_dataset():
    with pytest.raises(KeyError, match="no raw parser"):
        raw.parse_raw(".", "nope")
