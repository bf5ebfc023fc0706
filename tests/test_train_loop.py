"""The training loop on the tiny config: resume equality, sharded == single device, no retracing."""
import json
import os
import pathlib
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from mta_jax.train import loop
from mta_jax.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    return load_config("tiny", **overrides)


def losses(workdir):
    return {r["step"]: r["outer/loss"] for r in metrics_lib.read_metrics(workdir)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    wd = tmp_path_factory.mktemp("full")
    state = loop.train(tiny_config(), wd, str(data_dir))
    return wd, state


def test_metrics_rows_and_checkpoints(uninterrupted):
    wd, state = uninterrupted
    rows = metrics_lib.read_metrics(wd)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"outer/loss", "inner/loss_pre", "inner/loss_post", "outer/acc", "step_time_sec"} <= set(r)
        assert np.isfinite(r["outer/loss"])
    assert int(jax.device_get(state.step)) == 4
    saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 4]
    # The frozen base is never saved: the checkpoint is the size of the LoRA + optimiser state.
    size = sum(f.stat().st_size for f in (wd / "checkpoints" / "4").rglob("*") if f.is_file())
    assert size < 2_000_000


def test_sigterm_checkpoints_and_resume_gives_the_same_next_steps(uninterrupted, tmp_path, data_dir,
                                                                   monkeypatch):
    wd_full, _ = uninterrupted
    wd = tmp_path / "resumed"
    write = metrics_lib.MetricWriter.write

    def write_then_preempt(self, step, metrics):
        row = write(self, step, metrics)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a pre-emption notice mid-run
        return row

    with monkeypatch.context() as m:
        m.setattr(metrics_lib.MetricWriter, "write", write_then_preempt)
        state = loop.train(tiny_config(checkpoint_every=100), wd, str(data_dir))
    assert int(jax.device_get(state.step)) == 2          # stopped early ...
    assert (wd / "checkpoints" / "2").is_dir()           # ... with a checkpoint although 2 % 100 != 0
    loop.train(tiny_config(checkpoint_every=100), wd, str(data_dir))   # resumes at 2, runs 3..4
    full, resumed = losses(wd_full), losses(wd)
    assert resumed[2] == pytest.approx(full[2], rel=1e-6)
    assert resumed[4] == pytest.approx(full[4], rel=1e-6)


def test_sigterm_is_acted_on_within_a_step_not_a_log_interval(tmp_path, data_dir, monkeypatch):
    """Steps are dispatched asynchronously; the loop keeps at most one in flight. Each step is made
    slow on the device (~15 GFLOP of extra matmuls, 0.1-0.3 s here) and the notice arrives 0.5 s
    after step 8's batch is built (the host is then at step ~6): the run must stop a few steps
    later, not at the end of the 60-step log interval after every step the host had already
    dispatched (a loop without the bound stopped at step 34 of 60 here, on a loaded machine)."""
    from mta_jax.train import workloads

    original = loop.make_step_fn

    def slow(*args, **kwargs):
        step = original(*args, **kwargs)

        def wrapped(*a):
            state, m = step(*a)
            x = jnp.full((768, 768), 1e-3, jnp.float32) + m["outer/loss"] * 0
            for _ in range(16):
                x = jnp.tanh(x @ x)
            return state, {**m, "outer/loss": m["outer/loss"] + 0 * x[0, 0]}
        return wrapped

    host_batch = workloads.EncoderWorkload.host_batch

    def batch_then_notice(self, i, n):
        if i == 8:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return host_batch(self, i, n)

    monkeypatch.setattr(loop, "make_step_fn", slow)
    monkeypatch.setattr(workloads.EncoderWorkload, "host_batch", batch_then_notice)
    state = loop.train(tiny_config(steps=60, log_every=60, checkpoint_every=100), tmp_path / "w",
                       str(data_dir))
    stopped = int(jax.device_get(state.step))
    assert 2 <= stopped <= 24, stopped
    assert (tmp_path / "w" / "checkpoints" / str(stopped)).is_dir()


def test_sharded_equals_single_device(tmp_path, data_dir):
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 fake CPU devices"
    # Three steps logged every step: the warm-up's first update is 0, and one Adam step is blind to
    # a gradient's scale, so the gradient norms are compared too (a sum instead of a mean over the
    # data axis would pass a loss-only check).
    cfg = {"steps": 3, "log_every": 1, "tasks_per_step": 8}
    one = loop.train(tiny_config(**cfg, **{"mesh.data": 1}), tmp_path / "one", str(data_dir))
    eight = loop.train(tiny_config(**cfg, **{"mesh.data": 8}), tmp_path / "eight", str(data_dir))
    rows_one, rows_eight = (metrics_lib.read_metrics(tmp_path / w) for w in ("one", "eight"))
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_eight] == [1, 2, 3]
    for a, b in zip(rows_one, rows_eight):
        for key in ("outer/loss", "outer/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    for a, b in zip(jax.tree.leaves(one.meta.params), jax.tree.leaves(eight.meta.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_step_is_traced_once(tmp_path, data_dir, monkeypatch):
    traces = []
    original = loop.make_step_fn

    def counting(*args, **kwargs):
        step = original(*args, **kwargs)

        def wrapped(*a):
            traces.append(1)  # runs only while jax traces the step
            return step(*a)
        return wrapped

    monkeypatch.setattr(loop, "make_step_fn", counting)
    loop.train(tiny_config(steps=4), tmp_path / "trace", str(data_dir))
    assert len(traces) == 1


def test_unknown_config_field_is_an_error(tmp_path, data_dir):
    c = tiny_config()
    c.unlock()
    c.episode.shots = 3  # not an EpisodeConfig field
    with pytest.raises(ValueError, match="shots"):
        loop.train(c, tmp_path / "bad", str(data_dir))


def test_config_json_is_written(uninterrupted):
    wd, _ = uninterrupted
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["model"]["path"] == "random-tiny" and cfg["steps"] == 4


def test_periodic_validation_matches_the_eval_of_the_checkpoint(tmp_path, data_dir):
    """``val/<set>/accuracy`` at a step is what ``launch/eval.py``'s ``mta`` gives that checkpoint,
    on the same protocol seed files and item subset (``eval.protocol_seeds`` and ``eval.max_items``
    apply to both)."""
    from mta_jax.train import evaluate

    wd = tmp_path / "val"
    seeds = {"eval.protocol_seeds": (1, 3), "eval.max_items": 96}
    loop.train(tiny_config(eval_every=2, keep_checkpoints=1, **seeds), wd, str(data_dir))
    rows = {r["step"]: r for r in metrics_lib.read_metrics(wd)}
    key = "val/metatool/val_sd/accuracy"
    assert key in rows[2] and key in rows[4] and rows[4]["val_eval_sec"] > 0
    results = evaluate.run(tiny_config(**seeds), wd, ["mta"], ["metatool/val_sd"], data_dir=str(data_dir),
                           log=lambda _: None)
    assert results["metatool/val_sd"]["mta"]["protocol_seeds"] == [1, 3]
    assert results["metatool/val_sd"]["mta"]["n"] == 96 and results["metatool/val_sd"]["mta"]["n_total"] == 1920
    assert rows[4][key] == pytest.approx(results["metatool/val_sd"]["mta"]["accuracy"], abs=1e-9)


@pytest.mark.parametrize("overrides, match", [
    ({"eval_every": 3}, "multiple of config.log_every"),
    ({"eval_every": 2, "eval.val_sets": ()}, "val_sets is empty"),
    ({"eval_every": -1}, "eval_every must be >= 0"),
])
def test_bad_validation_settings_are_errors(tmp_path, data_dir, overrides, match):
    with pytest.raises(ValueError, match=match):
        loop.train(tiny_config(**overrides), tmp_path / "bad", str(data_dir))


def test_periodic_validation_of_a_decoder_is_an_error(tmp_path, data_dir):
    c = load_config("tiny_decoder", eval_every=2, log_every=2)
    with pytest.raises(ValueError, match="implemented for encoder models"):
        loop.train(c, tmp_path / "dec", str(data_dir))


def test_hidden_support_labels_train_on_the_entropy(tmp_path, data_dir):
    """Unlabelled support (entropy inner loss): trains, its support loss is an entropy (<= log C), and
    it is another run than the labelled one from the same episodes; bad combinations are errors."""
    base = {"meta.support_weight": 0.0, "steps": 2, "log_every": 2, "checkpoint_every": 2}
    loop.train(tiny_config(**base), tmp_path / "gold", str(data_dir))
    loop.train(tiny_config(**base, **{"episode.support_labels": "hidden"}), tmp_path / "hidden", str(data_dir))
    gold, hidden = (metrics_lib.read_metrics(tmp_path / k)[-1] for k in ("gold", "hidden"))
    c = tiny_config().episode.candidates
    assert np.isfinite(hidden["outer/loss"]) and 0 < hidden["inner/loss_pre"] <= np.log(c) + 1e-6
    assert hidden["outer/loss"] != pytest.approx(gold["outer/loss"], rel=1e-6)
    with pytest.raises(ValueError, match="support_weight=0"):
        loop.train(tiny_config(**{"episode.support_labels": "hidden"}), tmp_path / "sw", str(data_dir))
    with pytest.raises(ValueError, match="inner loop"):
        loop.train(tiny_config(**base, **{"episode.support_labels": "hidden", "meta.algorithm": "pooled",
                                          "meta.inner_steps": 0}), tmp_path / "pooled", str(data_dir))


def test_doc_support_trains_from_the_tools_docs(tmp_path, data_dir, monkeypatch):
    """``support_source="docs"``: the support queries are the episode tools' pseudo-queries (checked on
    the table the workload builds) and the run differs from the labelled-items one."""
    from mta_jax.data import render
    from mta_jax.train import state as state_lib
    from mta_jax.train import workloads

    over = {"meta.support_weight": 0.0, "steps": 2, "log_every": 2, "checkpoint_every": 2,
            "episode.support": 3, "episode.support_source": "docs"}
    wl = workloads.EncoderWorkload(state_lib.settings_from_config(tiny_config(**over)), data_dir)
    t = 7
    want, _ = wl.tok.encode([render.pseudo_query(wl.pool.tools[t])], wl.s.data.query_len)
    np.testing.assert_array_equal(wl.tables(wl.base)["docq_ids"][t], want[0])
    loop.train(tiny_config(**over), tmp_path / "docs", str(data_dir))
    loop.train(tiny_config(**{k: v for k, v in over.items() if k != "episode.support_source"}),
               tmp_path / "items", str(data_dir))
    docs, items = (metrics_lib.read_metrics(tmp_path / k)[-1] for k in ("docs", "items"))
    assert np.isfinite(docs["outer/loss"]) and docs["outer/loss"] != pytest.approx(items["outer/loss"], rel=1e-6)


def test_dataset_scale_overrides_the_loss_scale_of_its_episodes(uninterrupted, tmp_path, data_dir):
    """``loss.dataset_scale``: a listed dataset's episodes train exactly as with that global scale, the
    default run is unchanged when it repeats ``loss.scale``, and other datasets keep ``loss.scale``."""
    from mta_jax.train import state as state_lib
    from mta_jax.train import workloads

    scale = tiny_config().loss.scale
    loop.train(tiny_config(**{"loss.dataset_scale": f"metatool={scale}"}), tmp_path / "same", str(data_dir))
    loop.train(tiny_config(**{"loss.dataset_scale": "metatool=5"}), tmp_path / "per_dataset", str(data_dir))
    loop.train(tiny_config(**{"loss.scale": 5.0}), tmp_path / "global", str(data_dir))
    default, same, per_dataset, global_ = (losses(w) for w in (uninterrupted[0], tmp_path / "same",
                                                             tmp_path / "per_dataset", tmp_path / "global"))
    assert same == pytest.approx(default, rel=1e-6)
    assert per_dataset == pytest.approx(global_, rel=1e-6)
    assert per_dataset[max(per_dataset)] != pytest.approx(default[max(default)], rel=1e-3)

    s = state_lib.settings_from_config(tiny_config(**{"data.datasets": ("metatool", "toollens"),
                                                      "loss.dataset_scale": "toollens=40"}))
    wl = workloads.EncoderWorkload(s, data_dir)
    want = np.where(wl.pool.tool_dataset == wl.pool.datasets.index("toollens"), 40.0, scale)
    np.testing.assert_array_equal(wl.tables(wl.base)["tool_scale"], want)
    batch = wl.host_batch(0, 8)
    support, query = wl.task_sets(wl.base, wl.tables(wl.base), jax.tree.map(jnp.asarray, batch))
    np.testing.assert_array_equal(support["scale"], want[batch["tools"][:, 0]])
    np.testing.assert_array_equal(query["scale"], support["scale"])


@pytest.mark.parametrize("spec, match", [("metatool", "positive scale"), ("metatool=0", "positive scale"),
                                         ("metatool=x", "positive scale"), ("bfcl=10", "not a train dataset"),
                                         ("metatool=5,metatool=6", "given twice")])
def test_bad_dataset_scales_are_errors_naming_the_field(spec, match):
    from mta_jax.train import state as state_lib

    with pytest.raises(ValueError, match=f"config.loss.dataset_scale.*{match}"):
        state_lib.settings_from_config(tiny_config(**{"loss.dataset_scale": spec}))


def test_dataset_scale_of_a_decoder_is_an_error():
    from mta_jax.train import state as state_lib

    with pytest.raises(ValueError, match="dataset_scale is implemented for the encoder workload only"):
        state_lib.settings_from_config(load_config("tiny_decoder", **{"loss.dataset_scale": "metatool=5"}))


@pytest.mark.parametrize("field, value", [("support_labels", "hidden"), ("support_source", "docs")])
def test_support_options_of_a_decoder_are_errors(field, value):
    from mta_jax.train import state as state_lib

    c = load_config("tiny_decoder", **{f"episode.{field}": value, "meta.support_weight": 0.0})
    with pytest.raises(ValueError, match=f"episode.{field}=.*encoder workload only"):
        state_lib.settings_from_config(c)


def test_interpolated_lora_methods(uninterrupted, data_dir, monkeypatch):
    """``mta:A`` scores with the trained LoRA update scaled by A (WiSE-FT interpolation): ``mta:1``
    is ``mta``, ``mta:0`` is ``zero_shot``; bad suffixes are errors naming the method."""
    from mta_jax.eval import encoders
    from mta_jax.train import evaluate

    wd, _ = uninterrupted
    scales = []
    real = encoders.SharedBottomEncoder.embed_fn
    monkeypatch.setattr(encoders.SharedBottomEncoder, "embed_fn",
                        lambda self, lora: scales.append(None if lora is None else lora.scale) or real(self, lora))
    methods = ["zero_shot", "mta", "mta:1", "mta:0", "mta:0.5"]
    res = evaluate.run(tiny_config(), wd, methods, ["metatool/val_sd"], data_dir=str(data_dir),
                       log=lambda _: None, out_dir=wd / "mix_eval")["metatool/val_sd"]
    trained_scale = scales[1]
    assert scales == [None, trained_scale, trained_scale, 0.0, 0.5 * trained_scale], scales
    assert res["mta:1"]["accuracy"] == res["mta"]["accuracy"]
    assert res["mta:0"]["accuracy"] == pytest.approx(res["zero_shot"]["accuracy"], abs=1e-12)
    for bad, match in [("bm25:0.5", "only mta and ft"), ("mta:x", "not a number"), ("ft:-1", ">= 0")]:
        with pytest.raises(ValueError, match=match):
            evaluate.run(tiny_config(), wd, [bad], ["metatool/val_sd"], data_dir=str(data_dir), log=lambda _: None)


def test_finished_tells_a_completed_run_from_a_stopped_one(uninterrupted):
    _, state = uninterrupted
    assert loop.finished(state, tiny_config())
    assert not loop.finished(state, tiny_config(steps=5))


def test_resuming_a_workdir_with_another_config_is_refused(uninterrupted, tmp_path, data_dir):
    wd_full, _ = uninterrupted
    wd = tmp_path / "run"
    shutil.copytree(wd_full, wd)
    before = (wd / "config.json").read_text()
    with pytest.raises(ValueError, match=r"another config \(.*lora.rank: 2 -> 4"):
        loop.train(tiny_config(**{"steps": 6, "lora.rank": 4}), wd, str(data_dir))
    with pytest.raises(ValueError, match=r"another config \(.*seed: 0 -> 7"):
        loop.train(tiny_config(steps=6, seed=7), wd, str(data_dir))
    assert (wd / "config.json").read_text() == before      # the workdir still describes its own run
    # what may change on a resume: how long it runs, how often it logs and checkpoints, ...
    state = loop.train(tiny_config(steps=6, log_every=3, checkpoint_every=3), wd, str(data_dir))
    assert int(jax.device_get(state.step)) == 6


def test_a_workdir_saved_before_a_config_field_existed_resumes_under_its_neutral_value(
        uninterrupted, tmp_path, data_dir):
    """A run saved by a version without ``loss.dataset_scale`` is the same run as ``dataset_scale=""``
    (upgrading the library must not orphan workdirs), but not as any other value of the field."""
    wd_full, _ = uninterrupted
    wd = tmp_path / "old"
    shutil.copytree(wd_full, wd)
    stored = sorted(wd.glob("checkpoints/*/identity/metadata"))
    assert stored
    for path in stored:                       # what the older version wrote: no such field
        identity = json.loads(path.read_text())
        del identity["config"]["loss"]["dataset_scale"]
        path.write_text(json.dumps(identity))
    with pytest.raises(ValueError, match=r"another config \(loss.dataset_scale: '' -> 'metatool=5'\)"):
        loop.train(tiny_config(**{"steps": 6, "loss.dataset_scale": "metatool=5"}), wd, str(data_dir))
    state = loop.train(tiny_config(steps=6), wd, str(data_dir))
    assert int(jax.device_get(state.step)) == 6
    assert set(losses(wd)) >= {6}


@pytest.mark.parametrize("name", ["minilm_mta", "minilm_ft", "tiny", "tiny_decoder"])
def test_every_config_field_added_since_the_baseline_has_a_neutral_value(name):
    """Guards the resume of older workdirs: a compared config field that the baseline list does not
    hold must be in ``checkpoint.ADDED_FIELDS``, whose value must be the config's default."""
    from mta_jax.train import checkpoint

    listed = pathlib.Path(__file__).with_name("config_fields_baseline.txt").read_text().splitlines()
    baseline = {line.strip() for line in listed if line.strip() and not line.startswith("#")}
    fields = checkpoint._flat(load_config(name).to_dict())
    new = sorted(k for k in fields
                 if not checkpoint.is_resumable(k) and k not in baseline and k not in checkpoint.ADDED_FIELDS)
    assert not new, (f"configs/{name}.py: field(s) {new} are new since the baseline; add each to "
                     f"checkpoint.ADDED_FIELDS with the value that reproduces runs saved before it")
    for k, neutral in checkpoint.ADDED_FIELDS.items():
        if k in fields:
            assert fields[k] == neutral, f"configs/{name}.py: default {k}={fields[k]!r}, neutral {neutral!r}"


def test_a_checkpoint_of_other_shapes_is_refused_not_restored(uninterrupted, tmp_path):
    from mta_jax.train import checkpoint

    wd_full, state = uninterrupted
    ckpt = checkpoint.Checkpointer(wd_full / "checkpoints", 2, {}, create=False)
    try:
        bigger = jax.tree.map(lambda x: jnp.zeros(x.shape + (2,), x.dtype) if x.ndim == 3 else x, state)
        with pytest.raises(ValueError, match=r"checkpoint leaf .* is \(.*\) float32, but this config's state has"):
            ckpt.restore(bigger)
        restored, _ = ckpt.restore(state)           # the matching structure restores
        for a, b in zip(jax.tree.leaves(restored.meta.params), jax.tree.leaves(state.meta.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        ckpt.close()
    with pytest.raises(FileNotFoundError, match="no checkpoints folder"):
        checkpoint.Checkpointer(tmp_path / "typo" / "checkpoints", 1, {}, create=False)
    assert not (tmp_path / "typo").exists()


def test_init_from_takes_the_parameters_only_and_starts_a_new_run(uninterrupted, tmp_path, data_dir):
    wd_full, source = uninterrupted
    wd = tmp_path / "warm"
    state = loop.train(tiny_config(steps=2, init_from=str(wd_full)), wd, str(data_dir))
    assert int(jax.device_get(state.step)) == 2                 # steps 0..1 of its own, not 4..
    assert [r["step"] for r in metrics_lib.read_metrics(wd)] == [2]
    assert (wd / "checkpoints" / "2").is_dir()
    # the first step started from the source's parameters: it differs from a fresh start's first loss
    fresh_loss = losses(wd_full)[2]
    assert losses(wd)[2] != pytest.approx(fresh_loss, rel=1e-4)
    with pytest.raises(FileNotFoundError, match="init_from='/nonexistent/run'"):
        loop.train(tiny_config(steps=2, init_from="/nonexistent/run"), tmp_path / "cold", str(data_dir))


def test_base_identity_is_the_content_not_the_path():
    from mta_jax.train import checkpoint

    saved = {"base_name": "/venv-a/site-packages/minilm", "base_fingerprint": "abc"}
    checkpoint.check_identity(saved, {"base_name": "/venv-b/minilm", "base_fingerprint": "abc"}, where="w")
    with pytest.raises(ValueError, match="fingerprint"):
        checkpoint.check_identity(saved, {"base_name": "/venv-a/site-packages/minilm", "base_fingerprint": "abd"},
                                  where="w")


@pytest.mark.parametrize("field", ["log_every", "checkpoint_every", "steps"])
def test_zero_intervals_are_named_up_front(field):
    from mta_jax.train import state as state_lib

    with pytest.raises(ValueError, match=f"config.{field} must be an integer >= 1"):
        state_lib.settings_from_config(tiny_config(**{field: 0}))


def test_a_resume_after_a_hard_kill_keeps_one_row_per_step(uninterrupted, tmp_path, data_dir):
    """Killed after logging step 4 but before its checkpoint, mid-way through writing another row:
    the resumed run recomputes step 4, and metrics.jsonl ends with one row per step."""
    wd_full, _ = uninterrupted
    wd = tmp_path / "killed"
    shutil.copytree(wd_full, wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    with (wd / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "outer/lo')                       # a row cut off by the kill
    loop.train(tiny_config(), wd, str(data_dir))
    rows = metrics_lib.read_metrics(wd)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[1]["outer/loss"] == pytest.approx(losses(wd_full)[4], rel=1e-6)


def test_metric_writer_resume_names_a_corrupt_line_and_leaves_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        metrics_lib.MetricWriter(tmp_path).resume_at(2)
    assert path.read_text() == '{"step": 2}\nnot json\n{"step": 4}\n'
    path.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n')
    assert metrics_lib.MetricWriter(tmp_path).resume_at(4) == 1
    assert [r["step"] for r in metrics_lib.read_metrics(tmp_path)] == [2, 4]


def test_device_peak_memory_is_logged_where_the_backend_reports_it(monkeypatch):
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    # XLA's CPU client reports no memory statistics: no field rather than a made-up one.
    assert jax.local_devices()[0].memory_stats() is None and loop._device_memory() == {}
    monkeypatch.setattr(loop.jax, "local_devices", lambda: [Device({"peak_bytes_in_use": 3 * 2**20,
                                                                    "bytes_in_use": 2**20})])
    assert loop._device_memory() == {"device_peak_MB": 3.0}
    monkeypatch.setattr(loop.jax, "local_devices", lambda: [Device({"bytes_in_use": 2**20})])
    assert loop._device_memory() == {}
