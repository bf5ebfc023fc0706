"""Exports a trained run's LoRA as a PEFT adapter folder: ``python launch/export_peft.py --workdir DIR --out OUT``.

The base model is the run's own (``config.json`` in the workdir): the packaged MiniLM or a local BERT
folder for the encoder (PEFT arch ``bert``, a bare ``BertModel``), a local Llama / Qwen2 folder for the
decoder (``*ForCausalLM``). Load the result with ``peft.PeftModel.from_pretrained(base_model, OUT)``.
"""
import json
import pathlib
import sys

# Replace launch/ (whose select.py would shadow the stdlib module) by the repo root.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags, logging  # noqa: E402

from launch import _common  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with config.json and checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Folder to write adapter_config.json + adapter_model.safetensors to.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    _common.start(argv)
    from mta_jax.model import peft_export
    from mta_jax.train import loop, workloads

    workdir = pathlib.Path(_WORKDIR.value)
    path = workdir / "config.json"
    if not path.is_file():
        raise app.UsageError(f"{path}: not a training workdir (run launch/train.py first)")
    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    if model["kind"] == "decoder":
        bb = workloads.load_decoder_backbone(model["path"], model["dtype"], False)
        name, cfg, base, arch = bb.name, bb.cfg, bb.base, bb.cfg.arch
    else:
        name, cfg, base, _ = workloads.load_backbone(model["path"], model["dtype"], False)
        arch = "bert"
    settings, _, lora = loop.restore_trained(workdir, base, name)
    out = peft_export.export_peft(_OUT.value, lora, settings.lora, arch=arch, num_layers=cfg.num_layers,
                                  base_model_name_or_path=name)
    logging.info("wrote PEFT adapter (%s, %d layers) to %s", arch, cfg.num_layers, out)
    print(out)


if __name__ == "__main__":
    app.run(main)
