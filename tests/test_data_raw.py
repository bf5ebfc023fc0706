"""Raw public formats parse to exactly the normalized copies (tools, records, order, documented merges)."""
import json
import pathlib

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


def test_metatool_duplicate_merge(data_dir):
    _, splits = raw.parse_raw(data_dir, "metatool")
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


def _toollens_dir(tmp_path, queries, qrels):
    d = tmp_path / "raw" / "toollens"
    (d / "qrels").mkdir(parents=True)
    doc = ("category_name:Data, tool_name:Weather, api_name:forecast, api_description:the forecast, "
           "required_params: []")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": t, "text": doc}) + "\n" for t in ("t0", "t1")))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n" for q in queries))
    for split in ("train", "test"):
        (d / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return tmp_path


def test_toollens_qrels_scores_and_duplicate_query_ids(tmp_path):
    # BEIR: a score-0 pair is judged non-relevant, so t1 is not gold for q0
    _, splits = raw.parse_toollens(_toollens_dir(tmp_path / "a", ["q0"], "q0\tt0\t1\nq0\tt1\t0\n"))
    assert splits["test"][0].gold == ("t0",)
    with pytest.raises(records.DataError, match=r"train.tsv:2 field 'score': not a number"):
        raw.parse_toollens(_toollens_dir(tmp_path / "b", ["q0"], "q0\tt0\tyes\n"))
    with pytest.raises(records.DataError, match=r"queries.jsonl:2 field '_id': duplicate query id 'q0' \(first at line 1\)"):
        raw.parse_toollens(_toollens_dir(tmp_path / "c", ["q0", "q0"], "q0\tt0\t1\n"))


def test_bfcl_category_without_its_possible_answers_is_an_error(tmp_path, data_dir):
    src, dst = data_dir / "raw" / "bfcl", tmp_path / "raw" / "bfcl"
    (dst / "possible_answer").mkdir(parents=True)
    for f in src.rglob("*.json"):
        rel = f.relative_to(src)
        if rel != pathlib.Path("possible_answer/BFCL_v4_multiple.json"):
            (dst / rel).write_bytes(f.read_bytes())
    with pytest.raises(records.DataError, match=r"BFCL_v4_multiple.json: missing; BFCL category 'multiple'"):
        raw.parse_bfcl(tmp_path)


def test_malformed_seal_tools_and_api_bank_entries_are_named(tmp_path, data_dir):
    src, dst = data_dir / "raw" / "seal_tools", tmp_path / "raw" / "seal_tools"
    (dst / "dataset_for_finetune").mkdir(parents=True)
    for f in ("tool.jsonl", "dev.jsonl", "test_in_domain.jsonl", "dataset_for_finetune/dev.json",
              "dataset_for_finetune/test_in_domain.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    ft = dst / "dataset_for_finetune" / "dev.json"
    entries = json.loads(ft.read_text("utf-8"))
    del entries[3]["conversations"]
    ft.write_text(json.dumps(entries), "utf-8")
    with pytest.raises(records.DataError, match=r"dev.json entry 3: missing or malformed field \['conversations'\]"):
        raw.parse_seal_tools(tmp_path)
    d = tmp_path / "raw" / "api_bank" / "test-data"
    d.mkdir(parents=True)
    path = data_dir / "raw" / "api_bank" / "test-data" / "level-1-api.json"
    entries = json.loads(path.read_text("utf-8"))
    del entries[5]["input"]
    (d / "level-1-api.json").write_text(json.dumps(entries), "utf-8")
    with pytest.raises(records.DataError, match=r"level-1-api.json entry 5 field 'input'"):
        raw.parse_api_bank_level1(tmp_path)
