"""Seeded sweep: train MTA and the FT baseline once per training seed, evaluate, fold the tables.

  python launch/sweep.py --config configs/minilm_mta.py --ft_config configs/minilm_ft.py \
      --seeds=0,1,2,3,4 --root runs/sweep --methods=zero_shot,ft,mta \
      [--sets=metatool/val_sd,...] [--args=--config.steps=100] [--mta_args=...] [--jobs=1] [--predictions]

Per seed ``S``: ``launch/train.py`` into ``ROOT/mta_sS`` and ``ROOT/ft_sS`` (``--config.seed=S``;
a finished workdir just resumes at its last step), then ``launch/eval.py`` on ``ROOT/mta_sS`` with
``--ft_workdir ROOT/ft_sS``. ``ROOT/sweep.md`` / ``sweep.json`` hold mean ± std over training seeds
per cell and the paired differences ``mta − ft`` (and ``mta_adapt − ft_adapt``, ``mta:0.5 − ft:0.5``,
... for every MTA method whose FT counterpart is also listed) with win counts.
Each command's output goes to ``ROOT/logs/``; a failing command stops the sweep with its log tail.
``--args`` reach all three commands (e.g. ``--config.model.path=...``), ``--mta_args`` /
``--ft_args`` one training each; ``{seed}`` in any of them becomes the seed (e.g.
``--mta_args=--config.init_from=runs/ft/ft_s{seed}`` starts every seed from its own run).
``--predictions`` has every evaluation write its per-item predictions, which ``launch/compare.py
--predictions=ROOT/mta_s0/eval/predictions.jsonl.gz,...`` pools into per-query paired tests.
``--jobs`` runs that many seeds at once (a GPU with room to spare, or a many-core host), after the
first seed has run alone to fill the compilation cache; on a 2-core CPU keep 1.
"""
import pathlib
import sys

# Replace launch/ (whose select.py would shadow the stdlib module, which subprocess imports) by the
# repo root, before anything else is imported.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import concurrent.futures  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from launch import _common  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "configs/minilm_mta.py", "MTA config file (also the eval config).")
_FT_CONFIG = flags.DEFINE_string("ft_config", "configs/minilm_ft.py", "FT config file ('' = no FT runs).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_ROOT = flags.DEFINE_string("root", None, "Output root: ROOT/{mta,ft}_s<seed>, ROOT/sweep.md.")
_METHODS = flags.DEFINE_list("methods", ["zero_shot", "ft", "mta"], "Eval methods.")
_SETS = flags.DEFINE_list("sets", None, "Eval sets (default: the config's eval.sets).")
_ARGS = flags.DEFINE_string("args", "", "Extra arguments for every train and eval command ({seed}: the seed).")
_MTA_ARGS = flags.DEFINE_string("mta_args", "", "Extra arguments for the MTA training only ({seed}: the seed).")
_FT_ARGS = flags.DEFINE_string("ft_args", "", "Extra arguments for the FT training only ({seed}: the seed).")
_REEVAL = flags.DEFINE_bool("reeval", False, "Evaluate every seed again, even where WORKDIR/eval already holds "
                            "the same methods and sets and is newer than the checkpoints.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Seeds run concurrently.")
_PREDICTIONS = flags.DEFINE_bool("predictions", False, "Evaluate with --predictions: every seed's "
                                 "mta_s<seed>/eval/predictions.jsonl.gz, for launch/compare.py.")
flags.mark_flags_as_required(["root"])


def _abs_config(spec: str) -> str:
    """A config flag value (``file.py`` or ``file.py:arg``) with the file made absolute: the commands
    run from the repo root, the user may not."""
    path, sep, arg = spec.partition(".py:")
    if not sep:
        return str(pathlib.Path(spec).resolve())
    return str(pathlib.Path(path + ".py").resolve()) + ":" + arg


def _run(cmd: list[str], log: pathlib.Path) -> float:
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=_common.REPO).returncode
    if rc:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{shlex.join(cmd)}\nexited with {rc}; log {log}, last lines:\n{tail}")
    return time.perf_counter() - t0


def _seed_args(flag: flags.FlagHolder, seed: int) -> list[str]:
    """A ``--*args`` flag's value as arguments, with every ``{seed}`` replaced by this seed (a plain
    replacement: other braces, e.g. in a regex, stay as they are)."""
    return shlex.split(flag.value.replace("{seed}", str(seed)))


def _seed_pipeline(seed: int, root: pathlib.Path, data_args: list[str]) -> pathlib.Path:
    from mta_jax.eval import sweep

    py, extra = sys.executable, _seed_args(_ARGS, seed)
    mta_dir, ft_dir = root / f"mta_s{seed}", root / f"ft_s{seed}"
    logs = root / "logs"
    common = ["--config.seed=" + str(seed)] + data_args + extra
    sec = _run([py, "launch/train.py", "--config", _abs_config(_CONFIG.value), "--workdir", str(mta_dir)] + common
               + _seed_args(_MTA_ARGS, seed), logs / f"train_mta_s{seed}.log")
    print(f"[sweep] seed {seed}: MTA trained in {sec:.0f}s", flush=True)
    eval_cmd = [py, "launch/eval.py", "--config", _abs_config(_CONFIG.value), "--workdir", str(mta_dir),
                "--methods=" + ",".join(_METHODS.value)] + data_args + extra
    if _FT_CONFIG.value:
        sec = _run([py, "launch/train.py", "--config", _abs_config(_FT_CONFIG.value), "--workdir", str(ft_dir)] + common
                   + _seed_args(_FT_ARGS, seed), logs / f"train_ft_s{seed}.log")
        print(f"[sweep] seed {seed}: FT trained in {sec:.0f}s", flush=True)
        eval_cmd += ["--ft_workdir", str(ft_dir)]
    if _SETS.value is not None:
        eval_cmd.append("--sets=" + ",".join(_SETS.value))
    if _PREDICTIONS.value:  # part of the compared arguments: an evaluation without them is redone
        eval_cmd.append("--predictions")
    ft = ft_dir if _FT_CONFIG.value else None
    if not _REEVAL.value and sweep.evaluation_is_current(mta_dir, _METHODS.value, _SETS.value, ft, eval_cmd[2:]):
        print(f"[sweep] seed {seed}: evaluation reused ({mta_dir / 'eval'} is newer than its checkpoints)",
              flush=True)
        return mta_dir / "eval" / "results.json"
    sec = _run(eval_cmd, logs / f"eval_s{seed}.log")
    print(f"[sweep] seed {seed}: evaluated in {sec:.0f}s", flush=True)
    return mta_dir / "eval" / "results.json"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mta_jax.eval import sweep

    try:
        seeds = sorted({int(s) for s in _SEEDS.value})
    except ValueError as e:
        raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from e
    if _JOBS.value < 1:
        raise app.UsageError(f"--jobs must be >= 1, got {_JOBS.value}")
    ft_methods = [m for m in _METHODS.value if m.startswith("ft")]  # evaluate.py's own rule for the FT run
    if ft_methods and not _FT_CONFIG.value:
        # eval.py would score them with the MTA run itself, and every "mta - ft" difference would be 0
        raise app.UsageError(f"--methods has FT methods {ft_methods} but --ft_config='' trains no FT run")
    root = pathlib.Path(_ROOT.value).resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    # Paths the user gave relative to their working directory, made absolute for the commands.
    data_args = [f"--data_dir={pathlib.Path(_common.DATA_DIR.value).resolve()}"] if _common.DATA_DIR.value else []
    if os.environ.get("MTA_DATA_DIR"):
        os.environ["MTA_DATA_DIR"] = str(pathlib.Path(os.environ["MTA_DATA_DIR"]).resolve())
    t0 = time.perf_counter()
    paths, rest = {}, seeds
    if _JOBS.value > 1:
        # The first seed alone fills the persistent compilation cache; the others then start compiled
        # (on a GPU, five processes compiling the second-order step at once took ~6 min each).
        paths[seeds[0]], rest = _seed_pipeline(seeds[0], root, data_args), seeds[1:]
    with concurrent.futures.ThreadPoolExecutor(_JOBS.value) as pool:
        futures = {s: pool.submit(_seed_pipeline, s, root, data_args) for s in rest}
        paths.update({s: f.result() for s, f in futures.items()})
    per_seed = sweep.read_runs(paths)
    out, md = sweep.write(root, per_seed, _METHODS.value, sweep.mta_ft_pairs(_METHODS.value))
    print(f"[sweep] {len(seeds)} seeds in {time.perf_counter() - t0:.0f}s (jobs={_JOBS.value}); "
          f"{out / 'sweep.md'}\n\n{md}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app.run(main)
