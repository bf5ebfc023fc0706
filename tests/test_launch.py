"""The entry points end to end on the tiny config, as a user runs them (subprocesses, real flags)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mta_jax.eval import methods as eval_methods, report, sets
from conftest import load_config, with_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(script, *args, env_extra=None, check=True, timeout=900):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("tiny")
    # outer.lr 0.05 (tiny: 1e-3): two steps move select's cosines by up to 1.5e-2 rather than 6e-5,
    # far above the 4 printed decimals, so test_select_ranks_a_small_catalogue sees the LoRA.
    run("train.py", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(wd),
        "--config.steps=2", "--config.log_every=1", "--config.outer.lr=0.05", f"--data_dir={data_dir}")
    return wd


def test_train_writes_metrics_contract(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("outer/loss" in r for r in rows)
    timing = {k for r in rows for k in r if "time" in k or k.endswith("_sec")}
    assert "step_time_sec" in timing


def test_transfer_reads_the_runs_logs(trained, tmp_path):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    weight = json.loads((trained / "config.json").read_text())["meta"]["support_weight"]
    for r in rows:  # the logged query loss is the objective without its support term
        np.testing.assert_allclose(r["outer/query_loss"], r["outer/loss"] - weight * r["inner/loss_pre"], rtol=1e-5)
    out = run("transfer.py", f"--workdirs={trained}").stdout.splitlines()
    cells = [c.strip() for c in out[-1].strip("|").split("|")]
    assert cells[:3] == [str(trained), "maml", "2"], cells
    pre, post, query = (np.mean([r[k] for r in rows]) for k in ("inner/loss_pre", "inner/loss_post", "outer/query_loss"))
    assert [float(c) for c in cells[3:6]] == [round(float(x), 3) for x in (pre, post, query)]
    assert cells[7] == f"{100 * (pre - query) / (pre - post):.0f}%"
    proc = run("transfer.py", f"--workdirs={tmp_path}", check=False)
    assert proc.returncode and f"{tmp_path / 'config.json'} not found" in proc.stderr
    (tmp_path / "config.json").write_text(json.dumps({"meta": {"algorithm": "maml"}}))
    proc = run("transfer.py", f"--workdirs={tmp_path}", check=False)
    assert proc.returncode and "no ['meta.support_weight']" in proc.stderr


def test_eval_writes_results_json_md_png(trained, tmp_path, data_dir):
    extra = tmp_path / "mytools"
    extra.mkdir()
    tools = [{"tool_id": f"t{i}", "name": n, "description": d, "parameters": None, "category": "x"}
             for i, (n, d) in enumerate([("weather", "Get the weather forecast for a city"),
                                         ("calculator", "Evaluate arithmetic expressions"),
                                         ("translate", "Translate text between languages")])]
    (extra / "tools.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tools))
    recs = [{"id": "a", "query": "will it rain in Oslo tomorrow", "gold": ["t0"], "candidates": None, "meta": {}},
            {"id": "b", "query": "what is 17 times 23", "gold": ["t1"], "candidates": None, "meta": {}},
            {"id": "c", "query": "say hello", "gold": [], "candidates": None, "meta": {}}]
    (extra / "custom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = run("eval.py", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(trained),
               "--methods=random,bm25,zero_shot,mta", f"--eval_dirs={extra}", f"--data_dir={data_dir}")
    results = report.read_results(trained / "eval" / "results.json")  # validates the schema
    assert set(results) == {"metatool/val_sd", "mytools/custom"}
    assert set(results["metatool/val_sd"]) == {"random", "bm25", "zero_shot", "mta"}
    val = results["metatool/val_sd"]["bm25"]
    assert val["n"] == 1920 and val["seeds"] == 5
    # bm25's accuracy recomputed in process from its scores: top-1 by hand, a tie for the best
    # candidate earns the gold's share of it; mean and sample std over the seeds.
    group = sets.build_sets(["metatool/val_sd"], data_dir)["metatool/val_sd"]
    per_seed = []
    for s, scores in zip(group, eval_methods.bm25_scorer()(group)):
        credit = 0.0
        for it, sc in zip(s.items, scores):
            best = np.flatnonzero(sc == sc.max())
            credit += sum(it.candidates[i] in it.gold for i in best) / len(best)
        per_seed.append(credit / len(s.items))
    assert len(per_seed) == 5 and len(set(per_seed)) > 1
    assert val["accuracy"] == np.mean(per_seed) and val["std"] == np.std(per_seed, ddof=1)
    custom = results["mytools/custom"]["bm25"]
    assert custom["n"] == 2 and custom["skipped_empty_gold"] == 1 and custom["std"] is None
    assert "recall@5" in custom
    assert (trained / "eval" / "results.png").stat().st_size > 1000
    assert "| metatool/val_sd |" in proc.stdout


def test_eval_predictions_feed_compare(trained, tmp_path, data_dir):
    out = tmp_path / "out"
    args = ["--config", str(REPO / "configs/tiny.py"), "--workdir", str(trained), "--methods=bm25,zero_shot,mta",
            "--sets=metatool/val_sd", "--config.eval.max_items=200", f"--data_dir={data_dir}", f"--out_dir={out}"]
    run("eval.py", *args, "--predictions")
    results = report.read_results(out / "results.json")["metatool/val_sd"]
    proc = run("compare.py", f"--predictions={out / 'predictions.jsonl.gz'}", "--a=mta", "--b=zero_shot",
               "--confusions=3")
    lines = proc.stdout.splitlines()
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["metatool/val_sd", "200", "5"], cells  # queries, not query x seed copies
    assert [float(c) for c in cells[3:5]] == [round(100 * results[m]["accuracy"], 1) for m in ("mta", "zero_shot")]
    better, worse = (int(x) for x in cells[6].split(" / "))
    assert better + worse <= 200 and 0 <= float(cells[7]) <= 1
    assert any(line.startswith("metatool/val_sd: mta's most frequent errors") for line in lines)
    assert any(line.startswith("metatool/val_sd: the gold tools where mta errs most") for line in lines)
    from mta_jax.eval import predictions  # the per-tool line, recomputed from the file
    by_gold = predictions.errors_by_gold(predictions.read(out / "predictions.jsonl.gz"), ("mta",), "metatool/val_sd")
    macro = 100 * np.mean([1 - row["mta"] / row["items"] for row in by_gold.values()])
    assert f"metatool/val_sd: per gold tool, each of the {len(by_gold)} weighted equally: mta {macro:.1f}," in proc.stdout
    proc = run("compare.py", f"--predictions={out / 'predictions.jsonl.gz'}", "--a=mta", "--b=ft", check=False)
    assert proc.returncode and "the files hold methods ['bm25', 'mta', 'zero_shot']" in proc.stderr
    run("eval.py", *args)  # without --predictions: the earlier file no longer describes results.json
    assert not (out / "predictions.jsonl.gz").exists() and (out / "results.json").is_file()


def test_eval_rejects_unknown_method(trained, data_dir):
    proc = run("eval.py", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(trained),
               "--methods=oracle", f"--data_dir={data_dir}", check=False)
    assert proc.returncode != 0 and "oracle" in proc.stderr


def test_select_ranks_a_small_catalogue(trained, tmp_path):
    from mta_jax.model import encoder
    from mta_jax.train import loop, workloads

    tools = [{"tool_id": "weather", "name": "weather", "description": "Weather forecast for any city",
              "parameters": None, "category": None},
             {"tool_id": "stocks", "name": "stocks", "description": "Live stock prices and charts",
              "parameters": None, "category": None}]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tools))
    proc = run("select.py", f"--tools={path}", "--query=forecast for Paris", "--query=AAPL share price",
               f"--workdir={trained}", "--top_k=2", "--json")
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["query"] for x in lines] == ["forecast for Paris", "AAPL share price"]
    # The cosines recomputed: the run's restored LoRA on the whole encoder, tools rendered by hand
    # ("name: description", what the run's compact_doc gives tools without a doc_text).
    run_config = json.loads((trained / "config.json").read_text())
    assert run_config["data"]["doc_style"] == "compact_doc"
    name, cfg, base, tok = workloads.load_backbone(run_config["model"]["path"], "float32", False)
    lora = loop.restore_trained(trained, base, name)[2]
    ids, mask = tok.encode(["forecast for Paris", "AAPL share price"]
                           + [f"{t['name']}: {t['description']}" for t in tools], 64)

    def cosines(adapter):
        e = np.asarray(encoder.encode(cfg, base, ids, mask, adapter), np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        return e[:2] @ e[2:].T

    want, zero_shot = cosines(lora), cosines(None)
    assert np.abs(want - zero_shot).max() > 1e-3  # the LoRA visibly moves the printed scores
    for x, row in zip(lines, want):
        ranked = [r["tool_id"] for r in x["ranking"]]
        assert ranked == [tools[i]["tool_id"] for i in np.argsort(-row)]  # best first
        # printed with 4 decimals: half a unit of rounding plus float32 noise
        np.testing.assert_allclose([r["score"] for r in x["ranking"]], np.sort(row)[::-1], rtol=0, atol=6e-5)


def test_train_without_data_fails_fast(tmp_path):
    nowhere = tmp_path / "nowhere"
    proc = run("train.py", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(tmp_path / "w"),
               env_extra={"MTA_DATA_DIR": str(nowhere), "MTA_CACHE": str(tmp_path / "cache")},
               check=False, timeout=120)
    assert proc.returncode == 1
    # records.resolve_data_dir's error, uncaught by launch/train.py (so Python prints it last, after
    # its traceback): it names what was tried and every way to fix it.
    assert proc.stderr.rstrip().splitlines()[-1] == (
        f"FileNotFoundError: no tool-selection data found ($MTA_DATA_DIR = {nowhere} has no normalized/ "
        "folder). Pass --data_dir, set MTA_DATA_DIR, or run `python -m mta_jax.data.fetch` to build the cache.")
    assert not (tmp_path / "w" / "checkpoints").exists()  # failed before any state was set up


def test_eval_adapt_methods_on_a_custom_set(trained, tmp_path, data_dir):
    d = tmp_path / "adaptset"
    d.mkdir()
    names = ["weather", "stocks", "translate", "music"]
    (d / "tools.jsonl").write_text("".join(json.dumps(
        {"tool_id": n, "name": n, "description": f"{n} service", "parameters": None, "category": None}) + "\n"
        for n in names))
    recs = [{"id": f"{g}{k}", "query": f"please use {g} now {k}", "gold": [g],
             "candidates": [g] + [n for n in names if n != g][:2], "meta": {}}
            for g in names[:2] for k in range(4)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run("eval.py", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(trained),
        f"--ft_workdir={trained}", "--methods=mta,mta_adapt,ft_adapt,mta_tta,ft_tta,mta_docs,ft_docs", "--sets=", f"--eval_dirs={d}",
        f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}")
    results = report.read_results(tmp_path / "out" / "results.json")  # --out_dir, not the workdir's eval/
    earlier = trained / "eval" / "results.json"
    assert not earlier.exists() or "adaptset/test" not in report.read_results(earlier)
    assert (tmp_path / "out" / "results.md").is_file()
    assert set(results) == {"adaptset/test"}
    row = results["adaptset/test"]
    assert set(row) == {"mta", "mta_adapt", "ft_adapt", "mta_tta", "ft_tta", "mta_docs", "ft_docs"} and all(e["n"] == 8 for e in row.values())


def test_config_files_load_and_report_bad_paths(tmp_path):
    from mta_jax import config_files

    ft = config_files.load(REPO / "configs" / "minilm_ft.py")
    mta = config_files.load(REPO / "configs" / "minilm_mta.py")
    assert ft.meta.algorithm == "pooled" and mta.meta.algorithm == "maml"
    assert ft.steps == mta.steps and ft.episode == mta.episode  # same budget and data stream
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_files.load(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(AttributeError, match="bad.py defines no get_config"):
        config_files.load(tmp_path / "bad.py")


# The measured minilm variants, each the defaults plus exactly these overrides (and, per method
# family, these eval methods): minilm_{mta,ft}_long are the 20x runs of session 17, the default
# rendering included; _deep the runs of sessions 10-11; _2shot the four seeds of session 22 and
# _2shot_l45 those of session 23, trained with these overrides on the command line.
_MINILM_VARIANTS = {
    "long": ({"steps": 500, "tasks_per_step": 16, "checkpoint_every": 250, "log_every": 50}, None),
    "deep": ({"data.doc_style": "full_doc", "data.doc_len": 128, "lora.first_layer": 2, "eval.adapt_steps": 3},
             {"mta": ("zero_shot", "zero_shot@full_doc", "mta", "mta_adapt"), "ft": ("ft", "ft_adapt")}),
    "2shot": ({"lora.first_layer": 2, "loss.scale": 10.0, "episode.tools_per_episode": 5,
               "episode.support": 10, "episode.query": 10},
              {"mta": ("zero_shot", "mta", "mta_adapt"), "ft": ("ft", "ft_adapt")}),
    "2shot_l45": ({"episode.tools_per_episode": 5, "episode.support": 10, "episode.query": 10},
                  {"mta": ("zero_shot", "mta", "mta_adapt"), "ft": ("ft", "ft_adapt")}),
}


@pytest.mark.parametrize("variant", sorted(_MINILM_VARIANTS))
def test_minilm_variant_configs_are_the_defaults_with_the_measured_overrides(variant):
    """Keep each measured variant config equal to what was measured: the defaults plus its overrides."""
    overrides, methods = _MINILM_VARIANTS[variant]
    for name in ("mta", "ft"):
        base = load_config(f"minilm_{name}", **overrides)
        if methods is not None:
            base.eval.methods = methods[name]
        assert load_config(f"minilm_{name}_{variant}").to_dict() == base.to_dict(), name


def test_smollm2_configs_are_the_decoder_recipe_sized_for_the_cpu():
    """smollm2_{mta,ft} were measured as qwen2_mta plus these overrides (FT: pooled, same budget)."""
    from mta_jax import config_files

    base = config_files.load(REPO / "configs" / "qwen2_mta.py", "/ckpt")
    overrides = {"steps": 100, "checkpoint_every": 50, "model.dtype": "float32", "tasks_per_step": 4,
                 "episode.support": 2, "episode.query": 2, "data.query_len": 320, "lora.first_layer": 26,
                 "outer.warmup": 10, "outer.lr": 1e-3, "eval.methods": ("zero_shot", "mta"),
                 "eval.sets": ("metatool/val_sd", "toollens/val_sd"), "eval.protocol_seeds": (0,),
                 "eval.max_items": 500, "eval.batch_size": 16}
    base = with_overrides(base, overrides)
    mta = config_files.load(REPO / "configs" / "smollm2_mta.py", "/ckpt")
    assert mta.to_dict() == base.to_dict()
    ft = config_files.load(REPO / "configs" / "smollm2_ft.py", "/ckpt")
    assert config_files.ft_baseline(base).to_dict() == ft.to_dict()


def test_default_xla_flags_never_override_the_users():
    from launch import _common

    flag = "--xla_cpu_experimental_ynn_fusion_type"
    gpu = "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"
    assert _common.with_default_xla_flags("") == f"{flag}=-reduce {gpu}"
    assert _common.with_default_xla_flags("--xla_force_host_platform_device_count=8") == \
        f"--xla_force_host_platform_device_count=8 {flag}=-reduce {gpu}"
    assert _common.with_default_xla_flags(f"{flag}=dot") == f"{flag}=dot {gpu}"
    # A user's own setting of a GPU flag wins too, in either spelling of the value.
    assert _common.with_default_xla_flags("--xla_gpu_autotune_level=4 --xla_gpu_enable_triton_gemm=true") == \
        f"--xla_gpu_autotune_level=4 --xla_gpu_enable_triton_gemm=true {flag}=-reduce"


def test_default_xla_flags_only_with_a_checked_jaxlib(monkeypatch):
    """XLA aborts on unknown flags: an unchecked jaxlib gets XLA_FLAGS untouched."""
    from launch import _common

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(_common.importlib.metadata, "version", lambda name: "0.99.0")
    _common.apply_default_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setattr(_common.importlib.metadata, "version", lambda name: "0.10.2")
    _common.apply_default_xla_flags()
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                       + " ".join(_common.DEFAULT_XLA_FLAGS))


def test_bench_decoder_times_the_training_step(data_dir):
    proc = run("bench_decoder.py", "--config", "configs/tiny_decoder.py", "--rounds=2", "--profile",
               f"--data_dir={data_dir}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("prep_s"))
    fields = dict(zip(line.split()[::2], line.split()[1::2]))
    assert float(fields["step_s"]) > 0 and float(fields["compile_s"]) > 0
    # The tiny decoder's random weights over MiniLM's ~30k vocabulary: a loss near log(V), as in training.
    assert abs(float(fields["loss"]) - np.log(30522)) < 1.5
    assert "tokens/step=" in proc.stdout and "profile: no device plane" in proc.stdout  # CPU: no kernels
