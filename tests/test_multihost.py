"""Multi-host training: two processes (one CPU device each, gloo collectives) through ``launch/train.py``
give the losses and parameters of a single process with a two-device mesh, and resume from their
own checkpoint."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import load_config

from mta_jax.train import loop
from mta_jax.train import metrics as metrics_lib
from mta_jax.train import workloads

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_two_processes(workdir, data_dir, steps):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "", "MTA_DATA_DIR": str(data_dir)}  # one device per process
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny.py"),
           "--workdir", str(workdir), f"--config.steps={steps}", "--config.mesh.data=-1",
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    return outs


def test_two_processes_equal_one_process_and_resume(tmp_path, data_dir):
    assert len(jax.devices()) >= 2, "the single-process reference needs 2 (fake) devices (tests/conftest.py)"
    # The reference does what the processes do: 2 steps, then a resumed run to 4 (whose longer
    # schedule changes the outer learning rates from step 3 on).
    for steps in (2, 4):
        ref = loop.train(load_config("tiny", **{"mesh.data": 2, "steps": steps}), tmp_path / "ref",
                         str(data_dir))
    wd = tmp_path / "multi"
    _train_two_processes(wd, data_dir, steps=2)
    outs = _train_two_processes(wd, data_dir, steps=4)       # resumes at step 2 from its checkpoint
    assert "in 2 process(es)" in outs[0] and "resumed" in outs[0]
    rows = metrics_lib.read_metrics(wd)                      # written by process 0 only
    assert [r["step"] for r in rows] == [2, 4]
    ref_rows = {r["step"]: r for r in metrics_lib.read_metrics(tmp_path / "ref")}
    for r in rows:
        for key in ("outer/loss", "outer/grad_norm"):
            assert r[key] == pytest.approx(ref_rows[r["step"]][key], rel=1e-6), (r["step"], key)
    name, _, base, _ = workloads.load_backbone("random-tiny", "float32", False)
    _, _, lora = loop.restore_trained(wd, base, name)
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(ref.meta.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
