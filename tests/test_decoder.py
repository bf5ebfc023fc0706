"""Decoder: parity with HF torch Llama/Qwen2, checkpoint import checks, LoRA algebra, full-size shapes."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mta_jax.model import decoder, hf_io, lora as lora_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, intermediate_size=40,
             attn_implementation="eager")
HF_MODELS = {
    # Qwen2: q/k/v bias, 4 query heads sharing 2 kv heads.
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 1000.0}, **SMALL)),
    "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **SMALL)),
    # Llama: one shared kv head, head_dim != hidden / heads, Llama-3.1 RoPE scaling whose three
    # frequency regimes all occur at head_dim 16 with original_max_position 16.
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **SMALL)),
}


def _randomize(model, seed=0):
    """O(1) logits: HF's 0.02 init would make a 1e-4 tolerance meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> (torch model, saved folder); built lazily, once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _randomize(HF_MODELS[name]())
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]
    return get


def _batch(seed, b=3, t=12, vocab=61, left=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    lengths = np.array([t, t - 5, t - 9])[:b]
    mask = np.arange(t)[None, :] < lengths[:, None]
    if left:
        mask = mask[:, ::-1]
    return ids, mask.astype(np.int32)


def _hf_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


_fwd = jax.jit(decoder.forward, static_argnums=0)


def _max_diff_on_tokens(ours, ref, mask):
    m = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(ours)[m] - ref[m])))


@pytest.mark.parametrize("name", ["qwen2", "llama", "qwen2_tied"])
@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_match_hf(hf, name, left):
    model, path = hf(name)
    cfg, params = decoder.load_hf(path)
    assert cfg.tie_embeddings == (name == "qwen2_tied") and ("lm_head" in params) != cfg.tie_embeddings
    ids, mask = _batch(1, left=left)
    ref = _hf_logits(model, ids, mask)
    assert np.std(ref[mask.astype(bool)]) > 0.3  # logits are O(1), so the tolerance bites
    assert _max_diff_on_tokens(_fwd(cfg, params, ids, mask), ref, mask) < 1e-4


def test_left_padding_equals_unpadded(hf):
    _, path = hf("qwen2")
    cfg, params = decoder.load_hf(path)
    ids, mask = _batch(2, left=True)
    padded = np.asarray(_fwd(cfg, params, ids, mask))
    n = int(mask[1].sum())
    alone = np.asarray(_fwd(cfg, params, ids[1:2, -n:], np.ones((1, n), np.int32)))
    np.testing.assert_allclose(padded[1, -n:], alone[0], atol=2e-5)


def test_bf16_checkpoint(hf, tmp_path):
    model, _ = hf("qwen2")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    ref_model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert next(iter(load_file(tmp_path / "model.safetensors").values())).dtype == jnp.bfloat16
    ids, mask = _batch(3)
    ref = _hf_logits(ref_model, ids, mask)
    cfg, params = decoder.load_hf(tmp_path)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert _max_diff_on_tokens(_fwd(cfg, params, ids, mask), ref, mask) < 1e-4
    # bf16 compute (and bf16 storage): looser, but still tracks the fp32 reference.
    cfg16, params16 = decoder.load_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    out16 = _fwd(cfg16, params16, ids, mask)
    assert out16.dtype == jnp.float32
    diff = _max_diff_on_tokens(out16, ref, mask)
    assert 0 < diff < 0.05 * np.abs(ref).max()


def test_sharded_checkpoint(hf, tmp_path):
    model, _ = hf("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / hf_io.INDEX).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    cfg, params = decoder.load_hf(tmp_path)
    ids, mask = _batch(4)
    assert _max_diff_on_tokens(_fwd(cfg, params, ids, mask), _hf_logits(model, ids, mask), mask) < 1e-4


def _copy_with(src, dst, *, config=None, tensors=None):
    """A copy of a saved model with an edited config.json and/or tensor dict."""
    dst.mkdir()
    conf = json.loads((src / "config.json").read_text())
    conf.update(config or {})
    (dst / "config.json").write_text(json.dumps(conf))
    t = load_file(src / "model.safetensors")
    save_file(tensors(t) if tensors else t, dst / "model.safetensors")
    return dst


def test_bad_checkpoints_raise_naming_the_problem(hf, tmp_path):
    _, path = hf("qwen2")
    extra = _copy_with(path, tmp_path / "extra", tensors=lambda t: {**t, "model.layers.0.extra.weight":
                                                                     np.zeros(3, np.float32)})
    with pytest.raises(hf_io.CheckpointError, match="model.layers.0.extra.weight"):
        decoder.load_hf(extra)
    ok_inv_freq = _copy_with(path, tmp_path / "inv", tensors=lambda t: {
        **t, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)})
    decoder.load_hf(ok_inv_freq)  # the buffer old checkpoints carry is ignored, not an error
    missing = _copy_with(path, tmp_path / "missing", tensors=lambda t: {
        k: v for k, v in t.items() if k != "model.layers.2.mlp.up_proj.weight"})
    with pytest.raises(hf_io.CheckpointError, match="layers.2.mlp.up_proj.weight"):
        decoder.load_hf(missing)
    shape = _copy_with(path, tmp_path / "shape", config={"intermediate_size": 41})
    with pytest.raises(hf_io.CheckpointError, match="gate_proj.weight.*shape"):
        decoder.load_hf(shape)
    for edit, msg in [({"model_type": "gpt2"}, "gpt2"), ({"hidden_act": "gelu"}, "gelu"),
                      ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
                      ({"use_sliding_window": True}, "sliding")]:
        with pytest.raises(ValueError, match=msg):
            decoder.DecoderConfig.from_hf({**json.loads((path / "config.json").read_text()), **edit})


def test_from_hf_reads_old_style_rope_theta():
    conf = dict(model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=8, rope_theta=123.0)
    cfg = decoder.DecoderConfig.from_hf(conf)
    assert cfg.rope_theta == 123.0 and cfg.num_kv_heads == 2 and cfg.head_dim == 4
    assert cfg.rope_scaling is None


# Published parameter counts (model cards / `num_parameters()` of the HF models).
@pytest.mark.parametrize("make, n_params, n_lora", [
    (decoder.DecoderConfig.qwen2_0_5b, 494_032_768, 24 * (896 * 8 + 8 * 896 + 896 * 8 + 8 * 128)),
    (decoder.DecoderConfig.llama3_8b, 8_030_261_248, 3_407_872),  # PEFT's count for r=8 on q,v
])
def test_full_size_shapes_without_allocating(make, n_params, n_lora):
    cfg = make()
    base = jax.eval_shape(functools.partial(decoder.init_params, cfg), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(base)) == n_params
    lcfg = lora_lib.LoRAConfig(rank=8, targets=r"layers/attn/(q|v)/kernel")
    lora = jax.eval_shape(lambda k: lora_lib.init_lora(k, base, lcfg), jax.random.key(1))
    assert sum(x.size for x in jax.tree.leaves(lora)) == n_lora
    logits = jax.eval_shape(functools.partial(decoder.forward, cfg),
                            base, jax.ShapeDtypeStruct((2, 16), jnp.int32),
                            jax.ShapeDtypeStruct((2, 16), jnp.int32), lora)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32


TINY = decoder.DecoderConfig(vocab_size=53, hidden_size=24, num_layers=3, num_heads=4, num_kv_heads=2,
                             head_dim=8, intermediate_size=32, qkv_bias=True, arch="qwen2")
ALL_KERNELS = r"layers/(attn|mlp)/.*/kernel"


@functools.lru_cache(maxsize=None)
def _tiny(cfg=TINY, first_layer=0, b_std=0.0, dtype=jnp.float32):
    params = jax.tree.map(lambda x: x.astype(dtype), decoder.init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda x: x * 2.5, params)  # logits O(1): comparisons are meaningful
    lcfg = lora_lib.LoRAConfig(rank=4, alpha=8.0, targets=ALL_KERNELS, first_layer=first_layer)
    lora = lora_lib.init_lora(jax.random.key(1), params, lcfg, dtype)
    leaves, tdef = jax.tree.flatten(lora.tree)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    lora = lora_lib.LoRAParams(jax.tree.unflatten(tdef, [
        x + b_std * jax.random.normal(k, x.shape, dtype) for x, k in zip(leaves, keys)]), lora.scale)
    return params, lora


def test_lora_zero_b_is_exact_and_merge_matches():
    params, fresh = _tiny()
    ids, mask = _batch(5, vocab=TINY.vocab_size)
    base = np.asarray(_fwd(TINY, params, ids, mask))
    np.testing.assert_array_equal(np.asarray(_fwd(TINY, params, ids, mask, fresh)), base)
    for first in (0, 2):
        params, lora = _tiny(first_layer=first, b_std=0.1)
        adapted = np.asarray(_fwd(TINY, params, ids, mask, lora))
        merged = np.asarray(_fwd(TINY, lora_lib.merge(params, lora), ids, mask))
        assert np.abs(adapted - base).max() > 1e-2  # the adapter really changes the model
        np.testing.assert_allclose(adapted, merged, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grad(cfg, params, lora, ids, mask, target):
    """Cross-entropy on the target span and its gradient w.r.t. LoRA only (the base is a constant)."""
    loss = lambda lo: -decoder.sequence_logprob(cfg, params, ids, mask, target, lo).sum()
    return jax.value_and_grad(loss)(lora)


@pytest.mark.parametrize("remat", [True, "dots_and_attn_probs"])
def test_lora_grads_match_finite_differences_in_float64(remat):
    """Through the rematerialised scan, so remat's recomputation is checked against math too."""
    with jax.enable_x64(True):
        cfg = dataclasses.replace(TINY, dtype="float64", param_dtype="float64", remat=remat)
        params, lora = _tiny(cfg, first_layer=1, b_std=0.3, dtype=jnp.float64)
        ids, mask = _batch(6, vocab=cfg.vocab_size)
        target = np.zeros_like(mask)
        target[:, 2:4] = 1
        f = lambda lo: _loss_and_grad(cfg, params, lo, ids, mask, target)[0]
        grads = _loss_and_grad(cfg, params, lora, ids, mask, target)[1]
        assert "remat" in str(jax.make_jaxpr(_loss_and_grad, static_argnums=0)(
            cfg, params, lora, ids, mask, target))  # the scan really rematerialises
        assert jax.tree.structure(grads) == jax.tree.structure(lora)  # gradients exist only for LoRA
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
        direction = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape)), lora)
        eps = 1e-6
        shift = lambda s: jax.tree.map(lambda x, d: x + s * d, lora, direction)
        fd = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-7)


def test_sequence_logprob_is_log_softmax_gather():
    params, lora = _tiny(first_layer=1, b_std=0.3)
    ids, mask = _batch(8, vocab=TINY.vocab_size)
    target = np.zeros_like(mask)
    target[0, 5:9], target[1, 3:6], target[2, 1:3] = 1, 1, 1
    got = np.asarray(jax.jit(decoder.sequence_logprob, static_argnums=0)(TINY, params, ids, mask, target, lora))
    logits = np.asarray(_fwd(TINY, params, ids, mask, lora), np.float64)
    want = []
    for b in range(ids.shape[0]):
        s = 0.0
        for t in np.flatnonzero(target[b]):
            row = logits[b, t - 1]
            s += row[ids[b, t]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        want.append(s)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    bad = target.copy()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match="token 0"):
        decoder.sequence_logprob(TINY, params, ids, mask, bad, lora)


def test_lora_from_another_model_is_rejected():
    params, _ = _tiny()
    other = dataclasses.replace(TINY, hidden_size=16)
    other_base = jax.eval_shape(functools.partial(decoder.init_params, other), jax.random.key(0))
    lora = lora_lib.init_lora(jax.random.key(1), other_base, lora_lib.LoRAConfig(targets=ALL_KERNELS))
    ids, mask = _batch(9, vocab=TINY.vocab_size)
    with pytest.raises(ValueError, match="LoRA leaf"):
        decoder.forward(TINY, params, ids, mask, lora)
    with pytest.raises(ValueError, match="max_position"):
        decoder.forward(dataclasses.replace(TINY, max_position=8), params, ids, mask)
    with pytest.raises(ValueError, match="batch, length"):
        decoder.forward(TINY, params, ids, mask[:, :-1])
    stray = lora_lib.LoRAParams({"embed": {"a": jnp.zeros((2, 2)), "b": jnp.zeros((2, 2))}}, 1.0)
    with pytest.raises(ValueError, match="top-level keys"):
        decoder.forward(TINY, params, ids, mask, stray)


def test_positions_and_segments_must_match_the_ids():
    params, _ = _tiny()
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"positions \(2, 4\) must match ids \(2, 5\)"):
        decoder.hidden_states(TINY, params, ids, ids, positions=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"segments \(5,\) must match ids \(2, 5\)"):
        decoder.hidden_states(TINY, params, ids, ids, segments=jnp.zeros((5,), jnp.int32))


def test_shared_bottom_then_top_equals_the_whole_forward():
    """bottom_states(stop) continued by hidden_states(bottom=...) equals hidden_states over all layers,
    with and without LoRA (which must start at or above stop), with packed segments and positions."""
    ids, mask = _batch(3, vocab=TINY.vocab_size)
    segments = jnp.asarray(np.repeat([[0] * 6 + [1] * 3 + [2] * 3], 3, axis=0))
    positions = jnp.asarray(np.repeat([list(range(6)) + [6, 7, 8] * 2], 3, axis=0))
    hidden = jax.jit(decoder.hidden_states, static_argnums=0)
    bottom = jax.jit(decoder.bottom_states, static_argnums=(0, 4))
    cont = jax.jit(lambda p, i, m, lo, x, pos, seg, stop: decoder.hidden_states(
        TINY, p, i, m, lo, positions=pos, segments=seg, bottom=(x, stop)), static_argnums=7)
    for first in (1, 2, None):
        params, lora = _tiny(first_layer=first or 0, b_std=0.1)
        lora = None if first is None else lora
        for pos, seg in ((None, None), (positions, segments)):
            want = np.asarray(hidden(TINY, params, ids, mask, lora, positions=pos, segments=seg))
            for stop in range(0, (first or TINY.num_layers) + 1):
                x = bottom(TINY, params, ids, mask, stop, positions=pos, segments=seg)
                got = np.asarray(cont(params, ids, mask, lora, x, pos, seg, stop))
                np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"LoRA from {first}, stop {stop}")
    params, lora = _tiny(first_layer=1, b_std=0.1)
    x = decoder.bottom_states(TINY, params, ids, mask, 2)
    with pytest.raises(ValueError, match="LoRA starts at layer 1, below the shared bottom's 2 layers"):
        decoder.hidden_states(TINY, params, ids, mask, lora, bottom=(x, 2))
    with pytest.raises(ValueError, match=r"stop=4 is outside \[0, 3\]"):
        decoder.bottom_states(TINY, params, ids, mask, 4)


@pytest.mark.parametrize("first_layer, use_lora", [(0, True), (2, True), (0, False)],
                         ids=["lora_all", "lora_top1", "no_lora"])
def test_cached_decode_equals_full_forward(first_layer, use_lora):
    """Prefill in two chunks, then one token at a time through the key/value cache: every new
    token's hidden state equals the full-sequence forward's at its column (left-padded rows, LoRA
    on all / the top / no layers, so the cache is split between the frozen and adapted stacks)."""
    params, lora = _tiny(first_layer=first_layer, b_std=0.1)
    lora = lora if use_lora else None
    ids, mask = _batch(7, t=12, vocab=TINY.vocab_size, left=True)
    full = np.asarray(decoder.hidden_states(TINY, params, ids, mask, lora))
    pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    cache = decoder.init_cache(TINY, 3, 12)
    chunks, got = [(0, 6), (6, 9)] + [(j, j + 1) for j in range(9, 12)], []
    step = jax.jit(decoder.decode, static_argnums=0)
    for a, b in chunks:
        h, cache = step(TINY, params, ids[:, a:b], pos[:, a:b], cache, a, mask, lora)
        got.append(np.asarray(h))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    assert np.abs(full[real]).mean() > 0.5
    np.testing.assert_allclose(got[real], full[real], atol=2e-5, rtol=2e-5)
    # The cache holds every layer's rotated keys; a cache that skips writing gives other states.
    h_stale, _ = step(TINY, params, ids[:, 9:10], pos[:, 9:10], decoder.init_cache(TINY, 3, 12), 9, mask, lora)
    assert np.abs(np.asarray(h_stale)[:, 0] - full[:, 9]).max() > 1e-2
    with pytest.raises(ValueError, match=r"key_mask \(3, 11\)"):
        decoder.decode(TINY, params, ids[:, :2], pos[:, :2], cache, 0, mask[:, :11], lora)
    with pytest.raises(ValueError, match="exceeds max_position"):
        decoder.init_cache(TINY, 1, TINY.max_position + 1)
