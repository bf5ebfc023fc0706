"""BERT encoder: parity with transformers' torch BertModel, HF loading, layer split, shapes, tokenizer."""
import dataclasses
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import meta
from mta_jax.data.tokenize import Tokenizer
from mta_jax.model import encoder as enc
from mta_jax.model import lora as lora_lib
from mta_jax.model import remat as remat_lib

SENTENCES = [
    "What's the weather like in Paris tomorrow?",
    "Book a table for two at an Italian restaurant near the station at 7pm on Friday evening, please.",
    "convert 100 USD to EUR",
    "hi",
    "",
    "Send an email to Alice with the quarterly report attached and copy Bob and Carol on it too, "
    "then schedule a follow-up meeting with the whole finance team for next Tuesday morning.",
    "Naïve café — Zürich, 東京 🙂",
    "search flights SFO → JFK",
]

TINY = enc.EncoderConfig(vocab_size=61, hidden_size=24, num_layers=3, num_heads=4, intermediate_size=40,
                         max_position=20)


def _torch_tiny_bert(seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
                                     num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_heads,
                                     intermediate_size=TINY.intermediate_size,
                                     max_position_embeddings=TINY.max_position, hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and biases, so swapped/transposed tensors show
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _tiny_batch(rng, b=4, t=12):
    ids = rng.integers(1, TINY.vocab_size, (b, t)).astype(np.int32)
    lengths = np.array([t, 1, 5, t - 3])[:b]
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    types = rng.integers(0, 2, (b, t)).astype(np.int32)
    return ids, mask, types


def _torch_hidden(model, ids, mask, types=None):
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long))
    return out.last_hidden_state.float().numpy()


def _valid_max_diff(a, b, mask):
    # Only real tokens: hidden states at padded *query* positions are numerically meaningless (torch's
    # own eager and sdpa paths disagree there by ~4e-5) and never reach the pooled embedding.
    return float(np.max(np.abs(np.asarray(a) - b) * mask[..., None]))


def test_minilm_matches_torch_sentence_transformers_recipe():
    transformers = pytest.importorskip("transformers")
    model_dir = enc.default_model_dir()
    cfg, params = enc.load_default()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    batch = tok(SENTENCES, truncation=True, max_length=24, padding="max_length", return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.sum(1).min() == 2 and mask.sum(1).max() == 24  # padding and truncation both exercised
    ref_h = _torch_hidden(transformers.BertModel.from_pretrained(str(model_dir)).eval(), ids, mask)
    m = mask[..., None]
    ref = (ref_h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)

    h = jax.jit(lambda p, i, mk: enc.hidden_states(cfg, p, i, mk))(params, ids, mask)
    assert _valid_max_diff(h, ref_h, mask) < 1e-5
    emb = np.asarray(jax.jit(lambda p, i, mk: enc.encode(cfg, p, i, mk))(params, ids, mask))
    assert np.max(np.abs(emb - ref)) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_tiny_torch_checkpoint_loads_and_matches(tmp_path):
    model = _torch_tiny_bert()
    model.save_pretrained(tmp_path)
    cfg, params = enc.load_hf(tmp_path)
    assert cfg == TINY
    ref_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(enc.init_params, TINY,
                                                                            jax.random.key(0)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == ref_shapes
    ids, mask, types = _tiny_batch(np.random.default_rng(0))
    h = enc.hidden_states(cfg, params, ids, mask, type_ids=types)
    assert _valid_max_diff(h, _torch_hidden(model, ids, mask, types), mask) < 1e-5


def test_bf16_checkpoint_and_compute(tmp_path):
    torch = pytest.importorskip("torch")
    model = _torch_tiny_bert(seed=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = enc.load_hf(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    ref_model = model.float()  # the same bf16-rounded weights, computed in float32
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]["kernel"][1]),
                                  ref_model.encoder.layer[1].attention.self.query.weight.detach().numpy().T)
    ids, mask, types = _tiny_batch(np.random.default_rng(1))
    ref = _torch_hidden(ref_model, ids, mask, types)
    assert _valid_max_diff(enc.hidden_states(cfg, params, ids, mask, type_ids=types), ref, mask) < 1e-5

    cfg16, params16 = enc.load_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype("bfloat16")}
    h16 = np.asarray(enc.hidden_states(cfg16, params16, ids, mask, type_ids=types))
    assert h16.dtype == np.float32  # residual stream / LayerNorm stay float32
    err = _valid_max_diff(h16, ref, mask)
    # bf16 matmuls really ran (float32 compute on these bf16 weights: 1.6e-6) and stayed close (outputs
    # are O(1), LN'd). Measured 0.021; LayerNorm computed in bf16 (cast back to f32) gives 0.051.
    assert 5e-3 < err < 0.04, err
    # Every LayerNorm of the bf16 forward (embeddings + 2 per layer, the scan body traced once)
    # normalises in float32: the rsqrt of the variance is f32.
    jaxpr = str(jax.make_jaxpr(lambda p: enc.hidden_states(cfg16, p, ids, mask, type_ids=types))(params16))
    rsqrt = re.findall(r"(\w+)\[[\d,]*\] = rsqrt", jaxpr)
    assert len(rsqrt) == 3 and set(rsqrt) == {"f32"}, rsqrt
    # One LayerNorm on bf16 inputs with bf16 parameters against float32 numpy (two-pass variance).
    rng = np.random.default_rng(2)
    x = jnp.asarray(3.0 + rng.normal(size=(5, 24)), jnp.bfloat16)  # an offset mean: bf16 stats would be off
    ln = {"scale": jnp.asarray(1 + 0.3 * rng.normal(size=24), jnp.bfloat16),
          "bias": jnp.asarray(0.3 * rng.normal(size=24), jnp.bfloat16)}
    y = enc.LayerNorm(1e-12, jnp.bfloat16).apply({"params": ln}, x)
    assert y.dtype == jnp.float32
    xf = np.asarray(x, np.float32)
    mu = xf.mean(-1, keepdims=True)
    want = (xf - mu) / np.sqrt(np.square(xf - mu).mean(-1, keepdims=True) + np.float32(1e-12))
    want = want * np.asarray(ln["scale"], np.float32) + np.asarray(ln["bias"], np.float32)
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=2e-6)


def test_run_layers_split_equals_full_forward():
    params = enc.init_params(TINY, jax.random.key(0))
    ids, mask, _ = _tiny_batch(np.random.default_rng(2))
    h0 = enc.embed(TINY, params, ids)
    lora_cfg = lora_lib.LoRAConfig(rank=2, targets=r"layers/(attn/(q|v)|mlp/up)/kernel", first_layer=1)
    lora = lora_lib.init_lora(jax.random.key(1), params, lora_cfg)
    lora = dataclasses.replace(lora, tree=jax.tree.map(lambda x: x + 0.3, lora.tree))  # non-zero b
    for adapter in (None, lora):
        full = np.asarray(enc.run_layers(TINY, params, h0, mask, adapter))
        np.testing.assert_allclose(enc.hidden_states(TINY, params, ids, mask, adapter), full, atol=1e-6)
        for k in range(TINY.num_layers + 1):
            cached = enc.run_layers(TINY, params, h0, mask, adapter, stop=k)
            resumed = enc.run_layers(TINY, params, cached, mask, adapter, start=k)
            np.testing.assert_allclose(resumed, full, atol=1e-6, err_msg=f"split at {k}")
    with pytest.raises(ValueError, match="start=2"):
        enc.run_layers(TINY, params, h0, mask, start=2, stop=1)


@pytest.mark.parametrize("remat,unroll,fuse", [(True, 1, False), ("dots_with_no_batch_dims_saveable", 1, False),
                                               ("dots_and_attn_probs", 1, False), (False, 2, False), (False, 1, True)])
def test_remat_unroll_and_fused_qkv_give_same_values_and_second_order_grads(remat, unroll, fuse):
    params = enc.init_params(TINY, jax.random.key(3))
    ids, mask, _ = _tiny_batch(np.random.default_rng(3))
    lora = lora_lib.init_lora(jax.random.key(1), params, lora_lib.LoRAConfig(rank=2))
    lora = dataclasses.replace(lora, tree=jax.tree.map(lambda x: x + 0.1, lora.tree))

    def loss(cfg):  # a MAML-like objective: grad of a function of a gradient
        f = lambda lo: jnp.sum(enc.encode(cfg, params, ids, mask, lo) ** 3)
        g = lambda lo: f(jax.tree.map(lambda a, b: a - 0.1 * b, lo, jax.grad(f)(lo)))
        return jax.value_and_grad(g)(lora)

    v1, g1 = loss(TINY)
    v2, g2 = loss(dataclasses.replace(TINY, remat=remat, scan_unroll=unroll, fuse_qkv=fuse))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_attn_probs_policy_saves_the_probabilities(capsys):
    params = enc.init_params(TINY, jax.random.key(3))
    ids, mask, _ = _tiny_batch(np.random.default_rng(3))
    lora = lora_lib.init_lora(jax.random.key(1), params, lora_lib.LoRAConfig(rank=2))
    b, t = ids.shape
    # The layer scan stacks per-layer residuals: saved probabilities are f32[L, B, H, T, T].
    probs = f"f32[{TINY.num_layers},{b},{TINY.num_heads},{t},{t}]"

    def saved(remat):
        cfg = dataclasses.replace(TINY, remat=remat)
        jax.ad_checkpoint.print_saved_residuals(lambda lo: jnp.sum(enc.encode(cfg, params, ids, mask, lo) ** 2),
                                                lora)
        return capsys.readouterr().out

    assert probs in saved("dots_and_attn_probs")
    assert probs not in saved("dots_with_no_batch_dims_saveable")
    assert probs not in saved(True)


def test_remat_policy_name_is_checked():
    params = enc.init_params(TINY, jax.random.key(3))
    ids, mask, _ = _tiny_batch(np.random.default_rng(3))
    with pytest.raises(ValueError, match="'dots_saveabel' is neither a bool nor a policy name"):
        enc.encode(dataclasses.replace(TINY, remat="dots_saveabel"), params, ids, mask)
    # a policy *factory* of jax.checkpoint_policies is not a policy: rejected up front, not when traced
    with pytest.raises(ValueError, match="'save_only_these_names' is neither"):
        meta.InnerConfig(remat="save_only_these_names")
    for name in remat_lib.JAX_POLICIES:  # every listed name is a ready-made policy that differentiates
        cfg = dataclasses.replace(TINY, remat=name)
        jax.grad(lambda p: enc.encode(cfg, p, ids, mask).sum())(params)


def test_padding_is_masked():
    params = enc.init_params(TINY, jax.random.key(4))
    ids, mask, _ = _tiny_batch(np.random.default_rng(4))
    other = np.where(mask == 1, ids, (ids + 7) % TINY.vocab_size)  # change only padded tokens
    np.testing.assert_allclose(enc.encode(TINY, params, other, mask), enc.encode(TINY, params, ids, mask),
                               atol=1e-6)
    assert not np.allclose(enc.encode(TINY, params, other, np.ones_like(mask)),
                           enc.encode(TINY, params, ids, np.ones_like(mask)), atol=1e-4)


def test_pool_is_masked_mean_then_unit_norm():
    rng = np.random.default_rng(5)
    h = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
    h[mask == 0] = 1e6  # padded garbage must not leak in
    want = np.stack([h[0, :2].mean(0), h[1].mean(0), h[2, 0]])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(enc.pool(jnp.asarray(h), jnp.asarray(mask)), want, rtol=1e-5, atol=1e-6)


def test_eval_shape_real_size_allocates_nothing():
    cfg = enc.EncoderConfig.from_hf({"model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
                                     "num_hidden_layers": 6, "num_attention_heads": 12,
                                     "intermediate_size": 1536, "max_position_embeddings": 512})
    shapes = jax.eval_shape(enc.init_params, cfg, jax.random.key(0))
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert shapes["layers"]["attn"]["q"]["kernel"].shape == (6, 384, 384)
    assert shapes["layers"]["mlp"]["up"]["kernel"].shape == (6, 384, 1536)
    d, f, n_layers = 384, 1536, 6
    per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    expected = 30522 * d + 512 * d + 2 * d + 2 * d + n_layers * per_layer
    assert sum(int(np.prod(x.shape)) for x in leaves) == expected  # 22,565,376 = MiniLM minus pooler


@pytest.mark.parametrize("field,value", [("model_type", "roberta"), ("hidden_act", "gelu_new"),
                                         ("position_embedding_type", "relative_key")])
def test_from_hf_rejects_other_architectures(field, value):
    hf = {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 16, field: value}
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        enc.EncoderConfig.from_hf(hf)


def test_tokenizer_matches_hf_fast_tokenizer():
    transformers = pytest.importorskip("transformers")
    model_dir = enc.default_model_dir()
    ours = Tokenizer.from_dir(model_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert ours.pad_id == hf.pad_token_id and ours.vocab_size == len(hf)
    texts = SENTENCES + ["word " * 80, "tab\tand\nnewline", "UPPER lower MiXeD"]
    for max_len in (3, 9, 32, 300):
        for side in ("right", "left"):
            hf.padding_side = side
            want = hf(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
            ids, mask = ours.encode(texts, max_len, pad_side=side)
            assert ids.dtype == np.int32 and mask.dtype == np.int32
            np.testing.assert_array_equal(ids, want["input_ids"], err_msg=f"{max_len} {side}")
            np.testing.assert_array_equal(mask, want["attention_mask"], err_msg=f"{max_len} {side}")
    ids, _ = ours.encode(texts, 16, add_special_tokens=False)
    assert ours.token_to_id("[CLS]") not in ids[:, 0]
    np.testing.assert_array_equal(ours.seq_lengths(texts), [len(x) for x in hf(texts)["input_ids"]])
    assert ours.decode(ours.encode(["Hello World"], 8)[0][0]) == "hello world"
    with pytest.raises(ValueError, match="pad_side"):
        ours.encode(texts, 8, pad_side="middle")
    with pytest.raises(KeyError, match="not-a-token"):
        ours.token_to_id("not-a-token")


def test_tokenizer_is_safe_to_share_between_threads():
    """encode() sets truncation on the shared Rust tokenizer; threads with different max_len must not
    see each other's setting (or an untruncated tokenize() call in between)."""
    import concurrent.futures

    ours = Tokenizer.from_dir(enc.default_model_dir())
    texts = ["word " * 200 + str(i) for i in range(32)]
    want = {n: ours.encode(texts, n) for n in (8, 300)}
    want_len = ours.seq_lengths(texts)

    def work(k):
        n = (8, 300)[k % 2]
        ids, mask = ours.encode(texts, n)
        lengths = ours.seq_lengths(texts)
        return (np.array_equal(ids, want[n][0]) and np.array_equal(mask, want[n][1])
                and np.array_equal(lengths, want_len))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(160)))
    assert all(results), f"{results.count(False)} of {len(results)} calls saw another thread's truncation"
