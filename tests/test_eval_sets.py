"""Eval-set builders: counts from the real data match the data README / stats.json; normalized dirs."""
import json

import pytest

from mta_jax.eval import sets

# The data README's §5 table.
SHIPPED_COUNTS = {"bfcl/multiple": 200, "bfcl/live_multiple": 1053, "seal_tools/dev": 700,
                  "seal_tools/test_in_domain": 700, "api_bank/level-1": 317}


@pytest.mark.parametrize("name, n", sorted(SHIPPED_COUNTS.items()))
def test_shipped_set_counts(data_dir, name, n):
    (s,) = sets.BUILTIN_SETS[name](data_dir, sets.PROTOCOL_SEEDS)
    assert s.name == name and s.seed is None and len(s.items) == n and s.skipped_empty_gold == 0
    assert all(it.candidates and it.gold for it in s.items)
    assert len({it.id for it in s.items}) == n


def test_api_bank_drops_get_user_token(data_dir):
    (s,) = sets.BUILTIN_SETS["api_bank/level-1"](data_dir, sets.PROTOCOL_SEEDS)
    assert not any("GetUserToken" in it.gold for it in s.items)
    assert sum(len(it.candidates) == 1 for it in s.items) == 105  # README §5


@pytest.mark.parametrize("dataset", ["metatool", "toollens"])
def test_protocol_sets_match_stats(data_dir, dataset):
    stats = json.loads((data_dir / "protocol" / dataset / "stats.json").read_text())
    group = sets.BUILTIN_SETS[f"{dataset}/test_sd"](data_dir, sets.PROTOCOL_SEEDS)
    assert [s.seed for s in group] == [0, 1, 2, 3, 4]
    for s in group:
        assert s.name == f"{dataset}/test_sd" and len(s.items) == stats["items_per_split"]["test"]
        assert all(len(it.candidates) == 5 and it.gold[0] in it.candidates for it in s.items)
    # same queries in every seed, different distractors
    assert [it.id for it in group[0].items] == [it.id for it in group[4].items]
    assert any(a.candidates != b.candidates for a, b in zip(group[0].items, group[1].items))
    (val,) = sets.protocol_group(data_dir, dataset, "val", "cd", seeds=(3,))
    assert val.seed == 3 and len(val.items) == stats["items_per_split"]["val"]
    assert set(sets.BUILTIN_SETS) >= {f"{dataset}/{sp}_{rg}" for sp in ("val", "test") for rg in ("sd", "cd")}


def test_build_sets_protocol_seed_subset(data_dir):
    groups = sets.build_sets(["metatool/val_sd", "bfcl/multiple"], data_dir, seeds=(2, 0))
    assert [s.seed for s in groups["metatool/val_sd"]] == [2, 0]
    assert [s.seed for s in groups["bfcl/multiple"]] == [None]  # single sets have no seeds
    full = sets.build_sets(["metatool/val_sd"], data_dir)["metatool/val_sd"]
    assert [it.candidates for it in groups["metatool/val_sd"][1].items] == [it.candidates for it in full[0].items]
    for bad in ((), (0, 5)):
        with pytest.raises(ValueError, match="protocol seeds"):
            sets.build_sets(["metatool/val_sd"], data_dir, seeds=bad)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_normalized_dir_null_candidates_and_empty_gold(tmp_path):
    d = tmp_path / "mini"
    d.mkdir()
    _write(d / "tools.jsonl", [{"tool_id": t, "name": t, "description": f"does {t}", "parameters": None,
                                "category": None} for t in ("a", "b", "c")])
    _write(d / "test.jsonl", [
        {"id": "1", "query": "q1", "gold": ["a"], "candidates": None, "meta": {}},
        {"id": "2", "query": "q2", "gold": [], "candidates": None, "meta": {}},
        {"id": "3", "query": "q3", "gold": ["b", "c"], "candidates": ["b", "a"], "meta": {}},
        {"id": "4", "query": "q4", "gold": [], "candidates": ["a"], "meta": {}},
    ])
    _write(d / "irrelevant.jsonl", [{"id": "1", "query": "q", "gold": [], "candidates": None, "meta": {}}])
    groups = sets.build_sets([str(d)])
    assert list(groups) == ["mini/test"]  # the all-empty split yields no set (logged)
    (s,) = groups["mini/test"]
    assert s.skipped_empty_gold == 2 and s.dataset == "mini"
    assert [(it.id, it.gold, it.candidates) for it in s.items] == [
        ("1", ("a",), None), ("3", ("b", "c"), ("b", "a"))]


def test_unknown_set_name():
    with pytest.raises(KeyError, match="bfcl/multiple"):
        sets.build_sets(["no/such_set"])
