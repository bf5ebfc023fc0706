"""The fixed protocol: split rule, item construction and candidate sampling reproduce the shipped files."""
import json

import numpy as np
import pytest

from mta_jax.data import records
from mta_jax.tasks import protocol

DATASETS = protocol.PROTOCOL_DATASETS


@pytest.fixture(scope="module")
def source(data_dir):
    return {d: protocol.load_source_records(data_dir, d) for d in DATASETS}


@pytest.mark.parametrize("dataset", DATASETS)
def test_tool_split_reproduces_splits_json(data_dir, source, dataset):
    splits = json.loads((data_dir / "protocol" / dataset / "splits.json").read_text())
    cat = source[dataset][0]
    assert sorted(splits) == sorted(cat.ids())
    assert {t: protocol.tool_split(dataset, t) for t in splits} == splits
    stats = json.loads((data_dir / "protocol" / dataset / "stats.json").read_text())
    counts = {s: sum(v == s for v in splits.values()) for s in protocol.SPLITS}
    assert counts == stats["tools_per_split"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_build_items_reproduces_train_items(data_dir, source, dataset):
    built = protocol.build_items(dataset, source[dataset][1])
    assert built["train"] == protocol.load_train_items(data_dir, dataset)
    stats = json.loads((data_dir / "protocol" / dataset / "stats.json").read_text())
    assert {s: len(v) for s, v in built.items()} == stats["items_per_split"]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("split, regime, seed", [("val", "sd", 0), ("val", "cd", 1), ("test", "sd", 2),
                                                 ("test", "cd", 4), ("test", "sd", 4)])
def test_sample_candidates_reproduces_files(data_dir, source, dataset, split, regime, seed):
    cat, recs = source[dataset]
    items = protocol.load_protocol_items(data_dir, dataset, split, regime, seed, source=recs)
    rng = np.random.default_rng(0)
    sample = [items[i] for i in rng.choice(len(items), 150, replace=False)]
    # Items with excluded tools exercise the "never a distractor" rule: a seeded 1,000 of them
    # (ToolLens test has ~8,600; all would take ~10 s per file).
    excluded = [it for it in items if it.excluded]
    sample += [excluded[i] for i in rng.choice(len(excluded), min(1000, len(excluded)), replace=False)]
    for it in sample:
        assert protocol.sample_candidates(it.id, it.gold, it.excluded, cat, regime, seed) == it.candidates, it.id
        assert not set(it.excluded) & set(it.candidates)


@pytest.mark.parametrize("dataset", DATASETS)
def test_sd_distractors_share_domain_except_counted_topups(data_dir, source, dataset):
    cat, recs = source[dataset]
    stats = json.loads((data_dir / "protocol" / dataset / "stats.json").read_text())
    for split in ("val", "test"):
        items = protocol.load_protocol_items(data_dir, dataset, split, "sd", 0, source=recs)
        topped = sum(any(cat.domain(c) != cat.domain(it.gold) for c in it.candidates) for it in items)
        assert [topped, len(items)] == stats["sd_topup"][f"{split}_seed0"]
        splits = protocol.load_splits(data_dir, dataset)
        assert all(splits[it.gold] == split for it in items)


def test_sd_topup_on_tiny_catalogue():
    tools = [records.Tool(f"t{i}", f"t{i}", "d", None, "A" if i < 3 else "B") for i in range(8)]
    cat = records.Catalogue(tools)
    c = protocol.sample_candidates("x::t0", "t0", (), cat, "sd", 0)
    # Only t1, t2 share A's domain: both are in, and the other two come from B.
    assert {"t1", "t2", "t0"} <= set(c) and sum(cat.domain(t) == "B" for t in c) == 2
    c = protocol.sample_candidates("x::t0", "t0", ("t1",), cat, "sd", 0)
    assert "t1" not in c and sum(cat.domain(t) == "B" for t in c) == 3


def test_bad_protocol_args(data_dir):
    with pytest.raises(ValueError, match="no fixed protocol"):
        protocol.load_train_items(data_dir, "bfcl")
    with pytest.raises(ValueError, match="regime"):
        protocol.load_protocol_items(data_dir, "metatool", "val", "xd", 0)
    with pytest.raises(ValueError, match="split"):
        protocol.load_protocol_items(data_dir, "metatool", "train", "sd", 0)


def test_bad_protocol_line_named(tmp_path):
    d = tmp_path / "protocol" / "metatool"
    d.mkdir(parents=True)
    (d / "train_items.jsonl").write_text('{"id": "a::x", "query": "q", "gold": "x", "excluded": []}\n'
                                         '{"id": "b::x", "query": "q", "gold": "x"}\n')
    with pytest.raises(records.DataError, match=r"train_items.jsonl:2 field 'excluded': missing field"):
        protocol.load_train_items(tmp_path, "metatool")


@pytest.mark.parametrize("field", ["gold", "query"])
def test_a_protocol_line_disagreeing_with_its_source_record_is_named(tmp_path, data_dir, source, field):
    d = tmp_path / "protocol" / "metatool"
    d.mkdir(parents=True)
    lines = (data_dir / "protocol" / "metatool" / "test_sd_seed0.jsonl").read_text("utf-8").splitlines()[:3]
    objs = [json.loads(x) for x in lines]
    if field == "gold":  # swap in another candidate as gold: the file stays well-formed
        objs[1]["gold"] = next(c for c in objs[1]["candidates"] if c != objs[1]["gold"])
    else:
        objs[1]["query"] += " (edited)"
    (d / "test_sd_seed0.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objs), "utf-8")
    with pytest.raises(records.DataError, match=rf"test_sd_seed0.jsonl:2 field '{field}': .* disagrees"):
        protocol.load_protocol_items(tmp_path, "metatool", "test", "sd", 0, source=source["metatool"][1])


def test_bad_splits_json_is_named(tmp_path):
    d = tmp_path / "protocol" / "metatool"
    d.mkdir(parents=True)
    (d / "splits.json").write_text('{"a": "train",', "utf-8")
    with pytest.raises(records.DataError, match=r"splits.json: not valid JSON"):
        protocol.load_splits(tmp_path, "metatool")
    (d / "splits.json").write_text('["a"]', "utf-8")
    with pytest.raises(records.DataError, match=r"splits.json: expected an object"):
        protocol.load_splits(tmp_path, "metatool")
