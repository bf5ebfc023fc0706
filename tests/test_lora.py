"""LoRA on the tiny encoder: identity at init, merge parity, gradients (vs finite differences), targets."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax.model import encoder as enc
from mta_jax.model import lora as lora_lib

CFG = enc.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=24,
                        max_position=16)
ALL_KERNELS = ["layers/attn/k/kernel", "layers/attn/o/kernel", "layers/attn/q/kernel",
               "layers/attn/v/kernel", "layers/mlp/down/kernel", "layers/mlp/up/kernel"]


def _noisy(tree, seed, scale):
    # NumPy noise: eager jax.random per leaf would compile dozens of tiny programs.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.normal(size=x.shape), x.dtype), tree)


@pytest.fixture(scope="module")
def base():
    # Perturbed so biases and LayerNorm parameters are non-trivial.
    return _noisy(enc.init_params(CFG, jax.random.key(0)), 1, 0.1)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, (3, 10)).astype(np.int32)
    mask = (np.arange(10)[None] < np.array([[10], [4], [7]])).astype(np.int32)
    return ids, mask


def _random_lora(base, targets=r"layers/.*/kernel", first_layer=0, rank=4, seed=2):
    cfg = lora_lib.LoRAConfig(rank=rank, alpha=8.0, targets=targets, first_layer=first_layer)
    fresh = lora_lib.init_lora(jax.random.key(seed), base, cfg)
    return fresh, dataclasses.replace(fresh, tree=_noisy(fresh.tree, seed + 1, 0.2))


def test_fresh_lora_is_bit_identical(base, batch):
    fresh, _ = _random_lora(base)
    b_leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(fresh.tree)[0] if p[-1].key == "b"]
    assert len(b_leaves) == len(ALL_KERNELS) and not any(np.any(b) for b in b_leaves)
    f = jax.jit(enc.encode)
    np.testing.assert_array_equal(f(CFG, base, *batch, fresh), f(CFG, base, *batch))


@pytest.mark.parametrize("first_layer", [0, 2])
def test_lora_equals_merged_weights(base, batch, first_layer):
    _, lora = _random_lora(base, first_layer=first_layer)
    f = jax.jit(enc.encode)
    with_lora = np.asarray(f(CFG, base, *batch, lora))
    merged = np.asarray(f(CFG, lora_lib.merge(base, lora), *batch))
    np.testing.assert_allclose(with_lora, merged, atol=1e-5)
    assert np.max(np.abs(with_lora - np.asarray(f(CFG, base, *batch)))) > 1e-3  # the adapter acts


def test_grad_is_lora_only_and_nonzero(base, batch):
    _, lora = _random_lora(base, targets=r"layers/attn/(q|v)/kernel|layers/mlp/up/kernel")
    target = jax.random.normal(jax.random.key(9), (3, CFG.hidden_size))
    loss = lambda lp: jnp.sum(enc.encode(CFG, base, *batch, lp) * target)
    grads = jax.jit(jax.grad(loss))(lora)
    assert isinstance(grads, lora_lib.LoRAParams) and grads.scale == lora.scale
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    paths = sorted(lora_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads.tree)[0])
    assert paths == [f"layers/{m}/{ab}" for m in ("attn/q", "attn/v", "mlp/up") for ab in "ab"]
    for p, g in jax.tree_util.tree_flatten_with_path(grads.tree)[0]:
        assert np.all(np.abs(np.asarray(g)).sum(axis=(1, 2)) > 0), lora_lib.path_str(p)  # every layer


def test_lora_grad_matches_finite_differences(base, batch):
    with jax.enable_x64(True):
        cfg = dataclasses.replace(CFG, dtype="float64", param_dtype="float64")
        base64 = jax.tree.map(lambda x: x.astype(jnp.float64), base)
        _, lora = _random_lora(base, first_layer=1)
        lora = jax.tree.map(lambda x: x.astype(jnp.float64), lora)
        target = jax.random.normal(jax.random.key(7), (3, CFG.hidden_size), jnp.float64)
        loss = jax.jit(lambda lp: jnp.sum(enc.encode(cfg, base64, *batch, lp) * target))
        direction = _noisy(jax.tree.map(jnp.zeros_like, lora), 8, 1.0)
        grad = jax.grad(loss)(lora)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
        eps = 1e-6
        step = lambda s: jax.tree.map(lambda x, d: x + s * eps * d, lora, direction)
        numeric = (loss(step(1.0)) - loss(step(-1.0))) / (2 * eps)
        assert abs(float(analytic)) > 1e-3
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6)


@pytest.mark.parametrize("first_layer", [1, 2])
def test_first_layer_only_changes_layers_at_or_above(base, batch, first_layer):
    _, lora = _random_lora(base, first_layer=first_layer)
    assert lora_lib.num_lora_layers(lora) == CFG.num_layers - first_layer
    h0 = enc.embed(CFG, base, batch[0])
    for stop in range(CFG.num_layers + 1):
        plain = np.asarray(enc.run_layers(CFG, base, h0, batch[1], stop=stop))
        adapted = np.asarray(enc.run_layers(CFG, base, h0, batch[1], lora, stop=stop))
        if stop <= first_layer:  # layers [0, stop) are all below first_layer
            np.testing.assert_array_equal(adapted, plain, err_msg=f"stop={stop}")
        else:
            assert np.max(np.abs(adapted - plain)) > 1e-3, f"stop={stop}"


@pytest.mark.parametrize("targets,expected", [
    (r"layers/attn/(q|v)/kernel", ["layers/attn/q/kernel", "layers/attn/v/kernel"]),
    (r"layers/mlp/(up|down)/kernel", ["layers/mlp/down/kernel", "layers/mlp/up/kernel"]),
    (r"layers/.*/kernel", ALL_KERNELS),
    (r"layers/attn/o/.*", ["layers/attn/o/bias", "layers/attn/o/kernel"]),
])
def test_target_regex_selects_exact_paths(base, targets, expected):
    assert lora_lib.target_paths(base, lora_lib.LoRAConfig(targets=targets)) == expected


def test_init_lora_shapes_follow_targets(base):
    lora = lora_lib.init_lora(jax.random.key(0), base,
                              lora_lib.LoRAConfig(rank=3, targets=r"layers/mlp/up/kernel", first_layer=1))
    assert jax.tree.map(lambda x: x.shape, lora.tree) == {
        "layers": {"mlp": {"up": {"a": (2, CFG.hidden_size, 3), "b": (2, 3, CFG.intermediate_size)}}}}


@pytest.mark.parametrize("targets,first_layer,message", [
    (r"layers/attn/q/bias", 0, "not a kernel"),
    (r"layers/attn/o/.*", 0, "not a kernel"),
    (r"attn/q/kernel", 0, "match no base parameter"),  # full match: a suffix is not enough
    (r"layers/attn/qq/kernel", 0, "match no base parameter"),
    (r"layers/attn/(q/kernel", 0, "not a valid regular expression"),
    (r"layers/attn/q/kernel", 3, "first_layer=3 out of range"),
    (r"embed/word", 0, "not a kernel"),
])
def test_bad_targets_raise(base, targets, first_layer, message):
    with pytest.raises(ValueError, match=message):
        lora_lib.init_lora(jax.random.key(0), base, lora_lib.LoRAConfig(targets=targets, first_layer=first_layer))


def test_encoder_rejects_lora_outside_layers(base, batch):
    _, lora = _random_lora(base)
    bad = dataclasses.replace(lora, tree={**lora.tree, "embed": {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match="embed"):
        enc.encode(CFG, base, *batch, bad)
