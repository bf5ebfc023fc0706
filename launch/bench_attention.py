"""Why the 5+5-item meta-step is not faster than torch: XLA's CPU batched matmul at attention shapes.

    python -m launch.bench_attention                    # the meta-step benchmark's doc shapes
    python -m launch.bench_attention --batch=5 --seq=32  # its query shapes

Times (best of ``--rounds`` means of ``--reps`` calls, interleaved) of

1. one batched matmul ``(B*H, T, K) @ (B*H, K, T)`` and ``(B*H, T, T) @ (B*H, T, K)`` — the two
   products of attention — in XLA and in ``torch.bmm`` with torch's default threads and with one;
2. the attention core ``softmax(q k^T / sqrt(K) + bias) v`` on ``(B, T, H, K)`` inputs laid out as the
   encoder has them, at differentiation order 0 (forward), 1 (``jax.grad``) and 2 (grad of a
   gradient-vector product, the meta-gradient's shape), in JAX (the encoder's einsums) and in torch
   (head-major contiguous inputs, so torch gets no transposes: a lower bound for it).

A compute-bound kernel on these 2 cores should take about half as long as on one; XLA's batched
matmul is the thing to look at. Needs torch (the ``hf`` extra) for the torch columns.
"""
import os
import time

from launch._common import apply_default_xla_flags, quiet_logs

apply_default_xla_flags()

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

flags.DEFINE_integer("batch", 25, "sequences per encoder call (bench_meta with 5+5 items: 5 items x 5 docs)")
flags.DEFINE_integer("seq", 64, "tokens per sequence")
flags.DEFINE_integer("heads", 12, "attention heads (MiniLM: 12)")
flags.DEFINE_integer("head_dim", 32, "head size (MiniLM: 32)")
flags.DEFINE_integer("reps", 10, "calls per timing")
flags.DEFINE_integer("rounds", 3, "interleaved timing rounds; the best is printed")
F = flags.FLAGS


def _time_ms(fn, reps):
    fn()  # warm: compile / allocate
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def _race(fns: dict, reps: int, rounds: int) -> dict:
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _time_ms(fn, reps))
    return best


def _attention(q, k, v, bias, head_dim):
    s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(head_dim) + bias
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1), v)


def _jax_orders(q, k, v, w, bias, head_dim):
    """Order 0, 1, 2 callables (no arguments) for the attention core; every array is an argument
    of the jitted function (a closed-over one would be constant-folded at compile time)."""
    f = lambda q, k, v, w, bias: _attention(q, k, v, bias, head_dim)
    grad = jax.grad(lambda q, k, v, w, bias: jnp.vdot(f(q, k, v, w, bias), w), argnums=(0, 1, 2))
    gvp = lambda q, k, v, w, bias: sum(jnp.vdot(g, w) for g in grad(q, k, v, w, bias))
    fns = [jax.jit(f), jax.jit(grad), jax.jit(jax.grad(gvp, argnums=(0, 1, 2)))]
    return [lambda fn=fn: jax.block_until_ready(fn(q, k, v, w, bias)) for fn in fns]


def _torch_orders(torch, q, k, v, w, head_dim):
    hm = lambda x: torch.tensor(np.asarray(x)).permute(0, 2, 1, 3).contiguous()
    tq, tk, tv = (hm(x).requires_grad_() for x in (q, k, v))
    tw = hm(w)
    f = lambda: torch.softmax(tq @ tk.transpose(-1, -2) / np.sqrt(head_dim), -1) @ tv

    def order0():
        with torch.no_grad():
            f()

    def order1():
        torch.autograd.grad((f() * tw).sum(), (tq, tk, tv))

    def order2():
        g = torch.autograd.grad((f() * tw).sum(), (tq, tk, tv), create_graph=True)
        torch.autograd.grad(sum((x * tw).sum() for x in g), (tq, tk, tv))

    return [order0, order1, order2]


def main(argv):
    del argv
    quiet_logs()
    b, t, h, kd = F.batch, F.seq, F.heads, F.head_dim
    rng = np.random.default_rng(0)
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: JAX columns only (pip install -e '.[hf]')")
    print(f"jax {jax.__version__} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"B={b} T={t} H={h} K={kd}; best of {F.rounds} rounds x {F.reps} calls, ms")

    print("\n| product | MFLOP | XLA | torch | torch, 1 thread | XLA / torch |\n|---|---:|---:|---:|---:|---:|")
    for name, (m, c, n) in {"q k^T": (t, kd, t), "probs v": (t, t, kd)}.items():
        a = rng.standard_normal((b * h, m, c), np.float32)
        bb = rng.standard_normal((b * h, c, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(bb)
        mm = jax.jit(jnp.matmul)
        fns = {"xla": lambda: jax.block_until_ready(mm(ja, jb))}
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(bb)
            threads = torch.get_num_threads()

            def torch_at(n_threads):
                def run():
                    torch.set_num_threads(n_threads)
                    torch.bmm(ta, tb)
                    torch.set_num_threads(threads)
                return run
            fns.update(torch=torch_at(threads), torch1=torch_at(1))
        r = _race(fns, F.reps, F.rounds)
        mflop = 2 * b * h * m * c * n / 1e6
        tcol = lambda key: f"{r[key]:.2f}" if key in r else "–"
        ratio = f"{r['xla'] / r['torch']:.2f}" if "torch" in r else "–"
        print(f"| {name} | {mflop:.0f} | {r['xla']:.2f} | {tcol('torch')} | {tcol('torch1')} | {ratio} |")

    q, k, v, w = (jnp.asarray(rng.standard_normal((b, t, h, kd), np.float32)) for _ in range(4))
    bias = jnp.zeros((b, 1, 1, t), jnp.float32)
    jfns = _jax_orders(q, k, v, w, bias, kd)
    tfns = _torch_orders(torch, q, k, v, w, kd) if torch is not None else None
    print("\n| attention core | JAX | torch | JAX / torch |\n|---|---:|---:|---:|")
    for order in range(3):
        fns = {"jax": jfns[order]} | ({"torch": tfns[order]} if tfns else {})
        r = _race(fns, F.reps, F.rounds)
        ratio = f"{r['jax'] / r['torch']:.2f}" if "torch" in r else "–"
        tcol = f"{r['torch']:.1f}" if "torch" in r else "–"
        print(f"| order {order} | {r['jax']:.1f} | {tcol} | {ratio} |")


if __name__ == "__main__":
    app.run(main)
