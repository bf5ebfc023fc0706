"""Meta-trains LoRA on the train tools: ``python launch/train.py --config configs/X.py --workdir DIR``.

Overrides: ``--config.steps=100 --config.meta.inner_steps=3`` etc. Data: ``--data_dir`` or $MTA_DATA_DIR.
"""
import sys
import pathlib

# Replace launch/ (whose select.py would shadow the stdlib module) by the repo root.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import _common  # noqa: E402

PREEMPTED_EXIT = 143  # 128 + SIGTERM, as a shell reports a process killed by it

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics.jsonl).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    _common.start(argv)
    import jax
    from mta_jax.train import loop

    logging.info("JAX %s, devices: %s", jax.__version__, jax.devices())
    state = loop.train(_CONFIG.value, _WORKDIR.value, _common.DATA_DIR.value)
    if not loop.finished(state, _CONFIG.value):
        # Pre-empted (SIGTERM): checkpointed, not done. A non-zero status tells schedulers (and
        # launch/sweep.py) to run it again rather than to use a partly trained run.
        logging.warning("stopped at step %d of %d; rerun the same command to resume",
                        int(jax.device_get(state.step)), _CONFIG.value.steps)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    app.run(main)
