"""Second-order MAML meta-step on MiniLM + LoRA: JAX (``meta.make_meta_step``) vs a PyTorch loop.

    python -m launch.bench_meta --support=1 --query=1 --steps=1,3,5,10 --remat=1,0 --rounds=3
    python -m launch.bench_meta --support=5 --query=5 --steps=1,3 --task_chunk=1   # memory below torch

Workload (both sides, same weights and batches): ``--tasks`` tasks, each with ``--support`` and
``--query`` items; an item is a query of 32 tokens and 5 candidate docs of 64 tokens; the loss is
cross-entropy over the 5 candidates of 20 x cosine between mean-pooled, normalised embeddings.
LoRA r8 (alpha 16) on q and v of all 6 layers; inner SGD, outer Adam. The PyTorch reference is
written the way users do it today (learn2learn / higher style): a Python loop over tasks,
``torch.autograd.grad(create_graph=True)`` for the inner steps, manual LoRA on q/v of
``transformers.BertModel``. Rounds are interleaved (JAX, torch, JAX, ...) because the machine is
shared; medians and the torch/JAX ratio are printed. ``jax_compile_s`` is trace + lower + XLA
compile; ``jax_first_s`` adds the first step (no persistent cache here, on purpose). The encoder's
layers are rematerialised with the ``dots_with_no_batch_dims_saveable`` policy by default
(``--encoder_remat``). Peak memory: XLA's planned temp buffer size for JAX, and for both sides the
peak rise of process RSS during a step (sampled every 2 ms). In one process the allocator hands
freed pages to the next step (XLA's temp buffers to torch, or an earlier round's to a later one), so
that rise understates what a step needs; ``torch_fresh_MB`` is torch's rise over one step in a
fresh process that runs only torch (``--torch_probe``), the number to hold JAX's temp memory against.
"""
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP workers spin after each op by default and steal the 2 cores from the XLA step that
# follows in this interleaved benchmark (measured: JAX 5+5 step 16.3 s with spinning, 13.4 s without).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from launch._common import apply_default_xla_flags  # noqa: E402

# What the entry points run with (launch/_common.py); XLA's own default for comparison:
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+reduce
apply_default_xla_flags()

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mta_jax import meta  # noqa: E402
from mta_jax.model import encoder as enc  # noqa: E402
from mta_jax.model import lora as lora_lib  # noqa: E402

flags.DEFINE_integer("tasks", 4, "tasks per meta-step")
flags.DEFINE_integer("support", 1, "support items per task")
flags.DEFINE_integer("query", 1, "query items per task")
flags.DEFINE_list("steps", ["1", "3", "5", "10"], "inner step counts to measure")
flags.DEFINE_list("remat", ["1", "0"], "inner-loop remat settings to measure: 1, 0 or a "
                  "policy name (InnerConfig.remat; mta_jax.model.remat.checkpoint_layer)")
flags.DEFINE_string("encoder_remat", "dots_with_no_batch_dims_saveable",
                    "EncoderConfig.remat for each scanned layer: '' (off), 'full', or a "
                    "policy name (mta_jax.model.remat.checkpoint_layer)")
flags.DEFINE_integer("rounds", 3, "interleaved timing rounds (after the first call)")
flags.DEFINE_bool("torch", True, "run the PyTorch reference too")
flags.DEFINE_float("inner_lr", 1e-2, "inner SGD learning rate")
flags.DEFINE_bool("post_loss", False, "JAX also logs inner/loss_post (one more support forward per task)")
flags.DEFINE_bool("one_call", False, "JAX: pad queries to the doc length and encode queries and docs in "
                  "one encoder call (one layer scan instead of two per loss)")
flags.DEFINE_integer("task_chunk", 0, "JAX: tasks per chunk of a sequential lax.map (0: vmap all tasks)")
flags.DEFINE_bool("compile_only", False, "JAX only: report compile time and XLA temp memory, run nothing")
flags.DEFINE_integer("scan_unroll", 1, "JAX: EncoderConfig.scan_unroll (layers per scan iteration)")
flags.DEFINE_bool("fuse_qkv", False, "JAX: one matmul for the q/k/v projections (EncoderConfig.fuse_qkv)")
flags.DEFINE_list("hvp", ["reverse"], "JAX: InnerConfig.hvp settings to measure (reverse, forward)")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: torch's default)")
flags.DEFINE_string("torch_device", "cpu", "device of the PyTorch reference ('cpu' or 'cuda'); on 'cuda' its "
                    "memory column is torch.cuda.max_memory_allocated over a step and no fresh-process probe runs")
flags.DEFINE_integer("torch_probe", 0, "internal: run one torch meta-step with this many inner steps in "
                     "this (fresh) process, print its RSS rise as JSON and exit")
F = flags.FLAGS
_REPO = pathlib.Path(__file__).resolve().parents[1]

Q_LEN, D_LEN, N_CAND, RANK, ALPHA, SCALE = 32, 64, 5, 8, 16.0, 20.0


def _batches(rng, tasks, n, vocab):
    """Token ids with real-looking lengths (CLS ... SEP, then padding) and random labels."""
    def ids(shape, length):
        x = rng.integers(1000, vocab, shape + (length,)).astype(np.int32)
        lens = rng.integers(length // 2, length + 1, shape)
        mask = (np.arange(length) < lens[..., None]).astype(np.int32)
        x[..., 0] = 101
        np.put_along_axis(x, (lens - 1)[..., None], 102, axis=-1)
        return np.where(mask == 1, x, 0).astype(np.int32), mask

    q_ids, q_mask = ids((tasks, n), Q_LEN)
    d_ids, d_mask = ids((tasks, n, N_CAND), D_LEN)
    return {"q_ids": q_ids, "q_mask": q_mask, "d_ids": d_ids, "d_mask": d_mask,
            "label": rng.integers(0, N_CAND, (tasks, n)).astype(np.int32)}


def _remat_label(remat) -> str:
    return str(int(remat)) if isinstance(remat, bool) else remat


def make_jax_loss(cfg, one_call=False):
    def loss_fn(lora, base, batch):
        n = batch["q_ids"].shape[0]
        d_ids = batch["d_ids"].reshape(n * N_CAND, D_LEN)
        d_mask = batch["d_mask"].reshape(n * N_CAND, D_LEN)
        if one_call:
            pad = lambda x: jnp.pad(x, ((0, 0), (0, D_LEN - Q_LEN)))
            e = enc.encode(cfg, base, jnp.concatenate([pad(batch["q_ids"]), d_ids]),
                           jnp.concatenate([pad(batch["q_mask"]), d_mask]), lora)
            q, d = e[:n], e[n:].reshape(n, N_CAND, -1)
        else:
            q = enc.encode(cfg, base, batch["q_ids"], batch["q_mask"], lora)
            # All candidate docs of the batch in one encoder call.
            d = enc.encode(cfg, base, d_ids, d_mask, lora).reshape(n, N_CAND, -1)
        logits = SCALE * jnp.einsum("nd,nkd->nk", q, d)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1))
        return nll, {"acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return loss_fn


class _PeakRSS:
    """Samples this process's RSS in a thread; ``peak - start`` is the step's memory rise."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.rise = self.peak - self.start


class TorchMAML:
    """The reference: Python loop over tasks, create_graph inner steps, manual LoRA on q/v."""

    def __init__(self, model_dir, lora, inner_lr, lr=1e-4, device="cpu"):
        import torch
        import transformers
        self.torch = torch
        self.device = torch.device(device)
        # Eager attention: torch's CPU SDPA kernel has no double backward, which second order needs.
        self.model = transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False,
                                                            attn_implementation="eager")
        self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fast = {}
        self.params = []
        tree = lora.tree["layers"]["attn"]
        for i, layer in enumerate(self.model.encoder.layer):
            for name, lin in (("q", layer.attention.self.query), ("v", layer.attention.self.value)):
                a = torch.tensor(np.asarray(tree[name]["a"][i]), device=self.device, requires_grad=True)
                b = torch.tensor(np.asarray(tree[name]["b"][i]), device=self.device, requires_grad=True)
                self.params += [a, b]
                key = (i, name)
                lin.forward = self._lora_forward(lin, key, lora.scale)
        self.inner_lr = inner_lr
        self.opt = torch.optim.Adam(self.params, lr=lr)

    def _lora_forward(self, lin, key, scale):
        F_ = self.torch.nn.functional

        def forward(x):
            a, b = self.fast[key]
            return F_.linear(x, lin.weight, lin.bias) + scale * (x @ a) @ b
        return forward

    def _set(self, flat):
        keys = [(i, n) for i in range(len(self.model.encoder.layer)) for n in ("q", "v")]
        self.fast = {k: (flat[2 * j], flat[2 * j + 1]) for j, k in enumerate(keys)}

    def _tensor(self, x):
        return self.torch.from_numpy(x).to(self.device)

    def _encode(self, ids, mask):
        t = self.torch
        h = self.model(input_ids=self._tensor(ids).long(), attention_mask=self._tensor(mask).long()).last_hidden_state
        m = self._tensor(mask).float()[..., None]
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return t.nn.functional.normalize(mean, dim=-1)

    def loss(self, flat, b):
        self._set(flat)
        n = b["q_ids"].shape[0]
        q = self._encode(b["q_ids"], b["q_mask"])
        d = self._encode(b["d_ids"].reshape(n * N_CAND, D_LEN), b["d_mask"].reshape(n * N_CAND, D_LEN))
        logits = SCALE * self.torch.einsum("nd,nkd->nk", q, d.reshape(n, N_CAND, -1))
        return self.torch.nn.functional.cross_entropy(logits, self._tensor(b["label"]).long())

    def step(self, supports, queries, steps):
        t = self.torch
        n_tasks = supports["q_ids"].shape[0]
        self.opt.zero_grad()
        total = 0.0
        for i in range(n_tasks):
            s = {k: v[i] for k, v in supports.items()}
            q = {k: v[i] for k, v in queries.items()}
            fast = list(self.params)
            for _ in range(steps):
                grads = t.autograd.grad(self.loss(fast, s), fast, create_graph=True)
                fast = [p - self.inner_lr * g for p, g in zip(fast, grads)]
            lq = self.loss(fast, q) / n_tasks
            lq.backward()
            total += lq.item()
        self.opt.step()
        return total


def _torch_probe(lora, supports, queries) -> None:
    """One torch meta-step in this fresh process: prints ``{"rss_mb": ...}`` (see the module doc)."""
    ref = TorchMAML(enc.default_model_dir(), lora, F.inner_lr)
    with _PeakRSS() as r:
        ref.step(supports, queries, F.torch_probe)
    print(json.dumps({"rss_mb": r.rise / 2**20}))


def _fresh_torch_rss(steps: int) -> float:
    """Torch's RSS rise over one meta-step of ``steps`` inner steps, in a fresh process."""
    if F.torch_device != "cpu":
        return float("nan")
    args = [sys.executable, "-m", "launch.bench_meta", f"--torch_probe={steps}", f"--tasks={F.tasks}",
            f"--support={F.support}", f"--query={F.query}", f"--inner_lr={F.inner_lr}",
            f"--torch_threads={F.torch_threads}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=_REPO).stdout
    return float(json.loads(out.strip().splitlines()[-1])["rss_mb"])


def main(argv):
    del argv
    import dataclasses
    cfg, base = enc.load_default()
    cfg = dataclasses.replace(cfg, fuse_qkv=F.fuse_qkv, scan_unroll=F.scan_unroll)
    if F.encoder_remat:
        cfg = dataclasses.replace(cfg, remat=True if F.encoder_remat == "full" else F.encoder_remat)
    base = jax.device_put(base)
    lora = lora_lib.init_lora(jax.random.PRNGKey(0), base, lora_lib.LoRAConfig(rank=RANK, alpha=ALPHA))
    rng = np.random.default_rng(0)
    supports = _batches(rng, F.tasks, F.support, cfg.vocab_size)
    queries = _batches(rng, F.tasks, F.query, cfg.vocab_size)
    loss_fn = make_jax_loss(cfg, F.one_call)
    if (F.torch or F.torch_probe) and F.torch_threads:
        import torch
        torch.set_num_threads(F.torch_threads)
    if F.torch_probe:
        return _torch_probe(lora, supports, queries)
    outer = optax.adam(1e-4)
    ref = (TorchMAML(enc.default_model_dir(), lora, F.inner_lr, device=F.torch_device)
           if F.torch and not F.compile_only else None)
    on_cuda = ref is not None and ref.device.type == "cuda"
    print(f"# tasks={F.tasks} support={F.support} query={F.query} encoder_remat={F.encoder_remat} "
          f"post_loss={F.post_loss} one_call={F.one_call} task_chunk={F.task_chunk} fuse_qkv={F.fuse_qkv} scan_unroll={F.scan_unroll} load={os.getloadavg()[0]:.1f} "
          f"jax {jax.__version__} on {jax.devices()[0].platform} XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    print("steps remat hvp | jax_compile_s jax_first_s jax_step_s xla_temp_MB jax_rss_MB | torch_step_s torch_rss_MB "
          "torch_fresh_MB | torch/jax")
    for steps in (int(s) for s in F.steps):
        fresh = _fresh_torch_rss(steps) if ref is not None else float("nan")
        for remat, hvp in ((bool(int(r)) if r in ("0", "1") else r, h) for r in F.remat for h in F.hvp):
            inner = meta.InnerConfig(steps=steps, lr=F.inner_lr, remat=remat, hvp=hvp)
            algo = meta.MetaConfig("maml", inner,
                                   post_loss=F.post_loss, task_chunk=F.task_chunk or None)
            step = meta.make_meta_step(loss_fn, algo, outer, has_aux=True)
            state = meta.init_state(lora, algo, outer)
            t0 = time.perf_counter()
            compiled = step.lower(state, base, supports, queries).compile()
            compile_s = time.perf_counter() - t0  # trace + lower + XLA compile
            if F.compile_only:
                print(f"{steps:5d} {_remat_label(remat):>5} {hvp:>7} | compile {compile_s:6.1f} s, xla temp "
                      f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:6.0f} MB", flush=True)
                continue
            state, m = compiled(state, base, supports, queries)
            jax.block_until_ready(m)
            first = time.perf_counter() - t0
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            jt, tt, jr, tr = [], [], [], []
            for _ in range(F.rounds):
                with _PeakRSS() as r:
                    t0 = time.perf_counter()
                    state, m = compiled(state, base, supports, queries)
                    jax.block_until_ready(m)
                    jt.append(time.perf_counter() - t0)
                jr.append(r.rise / 2**20)
                if ref is not None:
                    if on_cuda:
                        ref.torch.cuda.synchronize()
                        ref.torch.cuda.reset_peak_memory_stats()
                        before = ref.torch.cuda.memory_allocated()
                    with _PeakRSS() as r:
                        t0 = time.perf_counter()
                        ref.step(supports, queries, steps)  # .item() per task syncs the device
                        tt.append(time.perf_counter() - t0)
                    tr.append((ref.torch.cuda.max_memory_allocated() - before if on_cuda else r.rise) / 2**20)
            med = lambda x: float(np.median(x)) if x else float("nan")
            print(f"{steps:5d} {_remat_label(remat):>5} {hvp:>7} | {compile_s:13.1f} {first:11.1f} {med(jt):10.3f} {temp:11.0f} {max(jr):10.0f} | "
                  f"{med(tt):12.3f} {max(tr) if tr else float('nan'):12.0f} {fresh:14.0f} | {med(tt) / med(jt):9.2f}",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
