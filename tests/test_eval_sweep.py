"""Folding per-seed results.json into a table over training seeds, and launch/sweep.py end to end."""
import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from mta_jax.eval import report, sweep

REPO = pathlib.Path(__file__).resolve().parents[1]


def _results(acc: dict) -> dict:
    """``{set: {method: accuracy}}`` -> a schema-valid results dict."""
    return {s: {m: {"accuracy": a, "std": 0.01, "n": 100} for m, a in row.items()} for s, row in acc.items()}


PER_SEED = {
    0: _results({"a/x": {"ft": 0.80, "mta": 0.82}, "b/y": {"ft": 0.50, "mta": 0.49}}),
    1: _results({"a/x": {"ft": 0.78, "mta": 0.81}, "b/y": {"ft": 0.55, "mta": 0.56}}),
    2: _results({"a/x": {"ft": 0.81, "mta": 0.80}, "b/y": {"ft": 0.52, "mta": 0.52}}),
}


def test_aggregate_is_mean_and_sample_std_over_seeds():
    table = sweep.aggregate(PER_SEED)
    for s in ("a/x", "b/y"):
        for m in ("ft", "mta"):
            xs = [PER_SEED[k][s][m]["accuracy"] for k in (0, 1, 2)]
            assert table[s][m]["per_seed"] == xs
            assert table[s][m]["mean"] == pytest.approx(statistics.fmean(xs), abs=1e-15)
            assert table[s][m]["std"] == pytest.approx(statistics.stdev(xs), abs=1e-15)
            assert table[s][m]["n"] == 100


def test_paired_difference_wins_and_std():
    p = sweep.paired(PER_SEED, "mta", "ft")
    d = [0.02, 0.03, -0.01]
    assert p["a/x"]["mean"] == pytest.approx(statistics.fmean(d))
    assert p["a/x"]["std"] == pytest.approx(statistics.stdev(d))
    assert (p["a/x"]["wins"], p["a/x"]["seeds"]) == (2, 3)
    assert p["b/y"]["wins"] == 1            # -0.01, +0.01, 0.00: a tie is not a win
    assert (p["a/x"]["losses"], p["b/y"]["losses"]) == (1, 1)
    # t = mean / (s / sqrt(3)) with mean 0.04/3 and s = sqrt(((0.02-m)^2 + (0.03-m)^2 + (-0.01-m)^2) / 2)
    m = 0.04 / 3
    s = ((0.02 - m) ** 2 + (0.03 - m) ** 2 + (-0.01 - m) ** 2) ** 0.5 / 2 ** 0.5
    assert p["a/x"]["t"] == pytest.approx(m / (s / 3 ** 0.5))
    assert p["a/x"]["sign_p"] == pytest.approx(0.5)    # P(W >= 2), W ~ Bin(3, 1/2) = (3 + 1) / 8
    assert p["b/y"]["sign_p"] == pytest.approx(0.75)   # the tie dropped: P(W >= 1), W ~ Bin(2, 1/2)


def test_sign_test_is_the_binomial_tail():
    assert sweep.sign_test(8, 0) == 1 / 256
    assert sweep.sign_test(6, 2) == (28 + 8 + 1) / 256
    assert sweep.sign_test(0, 4) == 1.0
    assert sweep.sign_test(0, 0) is None
    # Symmetry: P(W >= k) + P(W >= n - k + 1) = 1 for W ~ Bin(n, 1/2).
    for n in range(1, 12):
        for k in range(n + 1):
            assert sweep.sign_test(k, n - k) + (sweep.sign_test(n - k + 1, k - 1) if k else 0.0) == \
                pytest.approx(1.0)
    same = {k: _results({"a/x": {"ft": 0.5, "mta": 0.5}}) for k in range(3)}
    p = sweep.paired(same, "mta", "ft")["a/x"]
    assert (p["wins"], p["losses"], p["t"], p["sign_p"]) == (0, 0, None, None)
    assert "| a/x | 100 | 50.0 ± 0.0 | 50.0 ± 0.0 | +0.0 ± 0.0 (0/3) |" in \
        sweep.markdown(sweep.aggregate(same), {"mta − ft": {"a/x": p}})


def test_single_seed_has_no_std():
    table = sweep.aggregate({3: PER_SEED[0]})
    assert table["a/x"]["mta"]["std"] is None
    assert "| a/x | 100 | 80.0 | 82.0 |" in sweep.markdown(table)
    assert "n_total" not in table["a/x"]["mta"]


def test_subsampled_sets_keep_their_full_size():
    per_seed = json.loads(json.dumps(PER_SEED))
    for results in per_seed.values():
        for entry in results["a/x"].values():
            entry["n_total"] = 400
    table = sweep.aggregate({int(k): v for k, v in per_seed.items()})
    assert table["a/x"]["mta"]["n_total"] == 400 and "n_total" not in table["b/y"]["mta"]
    md = sweep.markdown(table)
    assert "| a/x | 100 of 400 | 79.7 ± 1.5 | 81.0 ± 1.0 |" in md and "| b/y | 100 | " in md


def test_method_order_and_missing_pairs_in_markdown():
    per_seed = {k: {**r, "c/z": {"ft": r["a/x"]["ft"]}} for k, r in PER_SEED.items()}
    table = sweep.aggregate(per_seed, ["mta", "ft", "zero_shot"])
    assert list(table["a/x"]) == ["mta", "ft"] and list(table["c/z"]) == ["ft"]
    md = sweep.markdown(table, {"mta − ft": sweep.paired(per_seed, "mta", "ft")})
    assert md.splitlines()[0] == "| eval set | n | mta | ft | mta − ft |"
    assert "| a/x | 100 | 81.0 ± 1.0 | 79.7 ± 1.5 | +1.3 ± 2.1 (2/3, p 0.500) |" in md
    assert "| c/z | 100 | – | 79.7 ± 1.5 | – |" in md


def test_disagreeing_seeds_are_errors():
    with pytest.raises(ValueError, match="seed 1 has eval sets"):
        sweep.aggregate({0: PER_SEED[0], 1: {"a/x": PER_SEED[1]["a/x"]}})
    broken = {0: PER_SEED[0], 1: _results({"a/x": {"ft": 0.8}, "b/y": {"ft": 0.5, "mta": 0.5}})}
    with pytest.raises(KeyError, match=r"training seed 1.*'a/x'.*\['mta'\]"):
        sweep.aggregate(broken)
    with pytest.raises(report.ResultsSchemaError, match="training seed 0"):
        sweep.aggregate({0: {"a/x": {"ft": {"accuracy": 1.5, "std": None, "n": 3}}}})
    with pytest.raises(ValueError, match="at least one"):
        sweep.aggregate({})


def test_sweep_end_to_end_on_tiny(tmp_path, data_dir):
    """Two seeds of tiny MTA + pooled FT through launch/sweep.py; the table is the per-seed results'."""
    root = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "launch" / "sweep.py"), "--config", "configs/tiny.py",
           "--ft_config", "configs/tiny.py", "--ft_args=--config.meta.algorithm=pooled --config.meta.support_weight=0",
           "--mta_args=--config.log_every=1{seed}",  # "{seed}" is each seed's own value
           "--seeds=1,0", f"--root={root}", "--methods=ft,mta", "--args=--config.steps=2", "--jobs=2",
           f"--data_dir={data_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_seed = {s: report.read_results(root / f"mta_s{s}" / "eval" / "results.json") for s in (0, 1)}
    for s in (0, 1):
        cfg = json.loads((root / f"ft_s{s}" / "config.json").read_text())
        assert (cfg["seed"], cfg["steps"], cfg["meta"]["algorithm"]) == (s, 2, "pooled")
        cfg = json.loads((root / f"mta_s{s}" / "config.json").read_text())
        assert (cfg["seed"], cfg["log_every"]) == (s, 10 + s)
    got = json.loads((root / "sweep.json").read_text())
    assert got["seeds"] == [0, 1]
    cell = got["table"]["metatool/val_sd"]["mta"]
    assert cell["per_seed"] == [per_seed[s]["metatool/val_sd"]["mta"]["accuracy"] for s in (0, 1)]
    diff = got["pairs"]["mta − ft"]["metatool/val_sd"]
    assert diff["mean"] == pytest.approx(statistics.fmean(
        per_seed[s]["metatool/val_sd"]["mta"]["accuracy"] - per_seed[s]["metatool/val_sd"]["ft"]["accuracy"]
        for s in (0, 1)))
    assert "| metatool/val_sd |" in proc.stdout and (root / "logs" / "eval_s1.log").is_file()
    # Run again naming tiny's one eval set: both evaluations are reused; with --reeval, redone.
    again = cmd + ["--sets=metatool/val_sd"]
    for extra, expect in (([], "evaluation reused"), (["--reeval"], "evaluated in")):
        proc = subprocess.run(again + extra, cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.stdout.count(expect) == 2, proc.stdout
    assert set(report.read_results(root / "mta_s0" / "eval" / "results.json")) == {"metatool/val_sd"}
    proc = subprocess.run(again + ["--predictions"], cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=900)  # the earlier evaluations lack the predictions: redone
    assert proc.returncode == 0 and proc.stdout.count("evaluated in") == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all((root / f"mta_s{s}" / "eval" / "predictions.jsonl.gz").is_file() for s in (0, 1))


def test_evaluation_is_current_needs_same_methods_sets_ft_and_newer_results(tmp_path):
    mta, ft = tmp_path / "mta", tmp_path / "ft"
    for d in (mta, ft):
        (d / "checkpoints" / "4").mkdir(parents=True)
        (d / "checkpoints" / "4" / "state").write_text("x")
    assert not sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft)      # nothing evaluated yet
    (mta / "eval").mkdir()
    (mta / "eval" / "results.json").write_text("{}")
    argv = ["--config", "c.py", "--config.eval.adapt_steps=3"]
    (mta / "eval" / "run.json").write_text(json.dumps({"methods": ["ft", "mta"], "sets": ["a/b"],
                                                       "ft_workdir": str(ft), "argv": argv}))
    assert sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft)
    assert sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft, argv)
    assert not sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft, argv[:2])  # other overrides
    # methods, sets and the FT workdir are compared by their resolved values, not as spelled
    assert sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft, argv + ["--sets=a/b", "--ft_workdir", "x"])
    (mta / "config.json").write_text("{}")
    later = (mta / "eval" / "results.json").stat().st_mtime + 10
    os.utime(mta / "config.json", (later, later))                                      # MTA run re-configured
    assert not sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft)
    os.utime(mta / "config.json", (later - 20, later - 20))
    assert sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft)
    assert not sweep.evaluation_is_current(mta, ["mta"], ["a/b"], ft)              # other methods
    assert not sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/c"], ft)        # other sets
    assert not sweep.evaluation_is_current(mta, ["ft", "mta"], None, ft)           # the config's sets
    assert not sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], None)      # other FT run
    later = (mta / "eval" / "results.json").stat().st_mtime + 10
    os.utime(ft / "checkpoints" / "4" / "state", (later, later))                    # FT retrained since
    assert not sweep.evaluation_is_current(mta, ["ft", "mta"], ["a/b"], ft)


def test_sweep_reports_the_failing_command(tmp_path, data_dir):
    # Run from elsewhere with relative paths: the sweep's commands run from the repo root, so it must
    # make them absolute (otherwise the failure would be a missing config file, not the bad field).
    cwd = REPO / "tests"  # resolved from the repo root instead, "../configs/tiny.py" points outside it
    rel = lambda p: os.path.relpath(p, cwd)
    cmd = [sys.executable, str(REPO / "launch" / "sweep.py"), "--config", rel(REPO / "configs/tiny.py"),
           "--ft_config=", "--methods=zero_shot,mta", "--seeds=0", f"--root={tmp_path / 'out'}",
           "--args=--config.no_such_field=1", f"--data_dir={rel(data_dir)}"]
    proc = subprocess.run(cmd, cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "train.py" in proc.stderr and "no_such_field" in proc.stderr and "train_mta_s0.log" in proc.stderr
    assert "No such file" not in proc.stderr and (tmp_path / "out" / "logs" / "train_mta_s0.log").is_file()
    # FT methods without an FT run would compare MTA with itself: refused before anything runs
    cmd[cmd.index("--methods=zero_shot,mta")] = "--methods=ft,mta"
    proc = subprocess.run(cmd, cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "FT methods ['ft'] but --ft_config=''" in proc.stderr


def test_mta_methods_are_paired_with_their_ft_counterparts():
    methods = ["zero_shot", "ft", "mta", "mta_adapt", "ft_adapt", "mta:0.5", "ft:0.5", "mta_tta", "ft:0.25"]
    assert sweep.mta_ft_pairs(methods) == [("mta", "ft"), ("mta_adapt", "ft_adapt"), ("mta:0.5", "ft:0.5")]
