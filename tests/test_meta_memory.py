"""Meta-step resources: temp memory flat in inner steps with remat, and tasks sharded on a mesh."""
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mta_jax import meta
from test_meta_step import _model, _tasks, base_loss


def _temp_bytes(steps, remat, hvp="reverse"):
    base, lora = _model(jax.random.PRNGKey(0), d=64, h=64, layers=4)
    cfg = meta.InnerConfig(steps=steps, lr=0.1, remat=remat, hvp=hvp)
    s, q = _tasks(jax.random.PRNGKey(1), 2, 512, d=64), _tasks(jax.random.PRNGKey(2), 2, 512, d=64)
    f = lambda p, base, s, q: meta.meta_loss(p, lambda p, b: base_loss(p, base, b)[0], s, q, cfg)
    compiled = jax.jit(jax.grad(f)).lower(lora, base, s, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_memory_does_not_grow_with_inner_steps():
    on1, on10 = _temp_bytes(1, True), _temp_bytes(10, True)
    off1, off10 = _temp_bytes(1, False), _temp_bytes(10, False)
    assert on10 < 2 * on1, (on1, on10)
    # Without remat the stored activations grow with the number of steps.
    assert off10 > 4 * off1, (off1, off10)
    # A checkpoint policy keeps part of each step: between full remat and none.
    pol10 = _temp_bytes(10, "dots_with_no_batch_dims_saveable")
    assert on10 < pol10 < off10, (on10, pol10, off10)
    # Forward-over-reverse HVPs with remat store only each step's input: flat in steps, and no
    # more than reverse mode's remat. Without remat they keep each step's linearization: growing.
    fwd1, fwd10 = _temp_bytes(1, True, "forward"), _temp_bytes(10, True, "forward")
    assert fwd10 < 2 * fwd1, (fwd1, fwd10)
    assert fwd10 <= on10, (fwd10, on10)
    lin1, lin10 = _temp_bytes(1, False, "forward"), _temp_bytes(10, False, "forward")
    assert lin10 > 4 * lin1, (lin1, lin10)
    assert _temp_bytes(10, "dots_with_no_batch_dims_saveable", "forward") < lin10


def test_sharded_tasks_match_unsharded():
    devices = np.array(jax.devices()[:4])
    assert devices.size == 4, "needs 4 devices (tests/conftest.py sets 8 fake CPU devices)"
    mesh = Mesh(devices, ("data",))
    base, lora = _model(jax.random.PRNGKey(0))
    algo = meta.MetaConfig(name="maml", inner=meta.InnerConfig(steps=2, lr=0.5))
    opt = optax.sgd(0.1)
    s, q = _tasks(jax.random.PRNGKey(1), 4, 8), _tasks(jax.random.PRNGKey(2), 4, 8)
    rep, tasks = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded = meta.make_meta_step(base_loss, algo, opt, has_aux=True,
                                  in_shardings=(rep, rep, tasks, tasks), out_shardings=(rep, rep))
    plain = meta.make_meta_step(base_loss, algo, opt, has_aux=True, jit=False)
    s1, m1 = sharded(meta.init_state(lora, algo, opt), base, s, q)
    s2, m2 = jax.jit(plain)(meta.init_state(lora, algo, opt), base, s, q)
    np.testing.assert_allclose(m1["outer/loss"], m2["outer/loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1.params, s2.params)




def _meta_step_temp(tasks, chunk):
    base, lora = _model(jax.random.PRNGKey(0), d=64, h=64, layers=4)
    algo = meta.MetaConfig("maml", meta.InnerConfig(steps=2, lr=0.1), task_chunk=chunk)
    s = _tasks(jax.random.PRNGKey(1), tasks, 512, d=64)
    q = _tasks(jax.random.PRNGKey(2), tasks, 512, d=64)
    opt = optax.sgd(0.1)
    step = meta.make_meta_step(base_loss, algo, opt, has_aux=True)
    state = meta.init_state(lora, algo, opt)
    return step.lower(state, base, s, q).compile().memory_analysis().temp_size_in_bytes


def test_task_chunks_hold_one_chunk_graph_at_a_time():
    # Per-chunk gradients (not a gradient through a sequential map): 8 tasks one at a time need
    # about the memory of one task, far less than all 8 vmapped.
    one, seq8, all8 = _meta_step_temp(1, None), _meta_step_temp(8, 1), _meta_step_temp(8, None)
    assert seq8 < 1.5 * one, (one, seq8)
    assert all8 > 4 * one, (one, all8)
