"""Eval-set builders: counts from the real data match the data README / stats.json; normalized dirs."""
import dataclasses
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


def _toy_set(n: int, seed: int | None = 0, name: str = "toy/val_sd") -> sets.EvalSet:
    from mta_jax.data.records import Catalogue, Tool

    cat = Catalogue((Tool("a", "a", "does a", None, None),))
    return sets.EvalSet(name, "toy", cat, tuple(sets.EvalItem(f"q{i}", f"query {i}", ("a",), ("a",))
                                                 for i in range(n)), seed=seed)


def test_subsample_is_a_fixed_uniform_subset_in_file_order():
    full = _toy_set(1000)
    sub = sets.subsample(full, 100)
    idx = [int(it.id[1:]) for it in sub.items]
    assert len(idx) == 100 == len(set(idx)) and idx == sorted(idx) and sub.total_items == 1000
    assert sub.items == tuple(full.items[i] for i in idx)  # the items themselves, untouched
    assert idx != list(range(100)) and max(idx) > 900  # spread over the file, not its head
    # Uniform: each decile of the file holds ~10 of the 100 (a head-biased draw fails this).
    assert all(3 <= sum(d * 100 <= i < (d + 1) * 100 for i in idx) <= 20 for d in range(10))
    assert sets.subsample(full, 100) == sub  # deterministic
    assert set(idx) <= {int(it.id[1:]) for it in sets.subsample(full, 300).items}  # nested
    # Another protocol seed file of the set (same queries): the same subset; another set: another.
    assert [it.id for it in sets.subsample(_toy_set(1000, seed=1), 100).items] == [it.id for it in sub.items]
    assert {it.id for it in sets.subsample(_toy_set(1000, name="toy/test_sd"), 100).items} != set(it.id for it in sub.items)
    # Chosen by id, not position: the same items from a shuffled file.
    shuffled = dataclasses.replace(full, items=full.items[::-1])
    assert {it.id for it in sets.subsample(shuffled, 100).items} == {it.id for it in sub.items}
    small = _toy_set(50)
    assert sets.subsample(small, 100) is small and small.total_items is None  # nothing to drop: unchanged
    with pytest.raises(ValueError, match=r"toy/val_sd\[seed 0\]: max_items must be >= 1"):
        sets.subsample(full, 0)


def test_options_from_config():
    import ml_collections

    assert sets.Options.from_config(ml_collections.ConfigDict({})) == sets.Options((0, 1, 2, 3, 4), 0)
    opts = sets.Options.from_config(ml_collections.ConfigDict({"protocol_seeds": (3,), "max_items": 7}))
    assert opts == sets.Options((3,), 7)
    with pytest.raises(ValueError, match="config.eval.max_items must be >= 0"):
        sets.Options.from_config(ml_collections.ConfigDict({"max_items": -1}))


def test_build_sets_max_items(data_dir):
    full = sets.build_sets(["metatool/val_sd", "bfcl/multiple"], data_dir, seeds=(0, 2))
    small = sets.build_sets(["metatool/val_sd", "bfcl/multiple"], data_dir, seeds=(0, 2), max_items=150)
    for name, group in small.items():
        for s, f in zip(group, full[name], strict=True):
            assert len(s.items) == 150 and s.total_items == len(f.items) > 150
            assert set(s.items) <= set(f.items) and s.seed == f.seed
    seed0, seed2 = small["metatool/val_sd"]
    assert [it.id for it in seed0.items] == [it.id for it in seed2.items]  # same queries...
    assert any(a.candidates != b.candidates for a, b in zip(seed0.items, seed2.items))  # ...other distractors
    # Built from scratch again (another process would do the same), the subsets are identical.
    again = sets.build_sets(["bfcl/multiple"], data_dir, max_items=150)["bfcl/multiple"]
    assert again[0].items == small["bfcl/multiple"][0].items
