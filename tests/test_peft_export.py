"""PEFT export: adapters written by us, loaded by ``peft.PeftModel`` on the HF torch model, give our outputs."""
import json

import jax
import numpy as np
import pytest

from mta_jax.model import decoder, lora as lora_lib, peft_export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, intermediate_size=40,
             attn_implementation="eager")


def _save_random(model, path, seed=0):
    """O(1) weights (HF's 0.02 init would make the tolerance meaningless), saved to ``path``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if ("norm" in name.lower()) else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


def _random_lora(params, targets, first_layer, seed=0):
    """A LoRA whose ``b`` is non-zero, so every exported tensor matters."""
    lcfg = lora_lib.LoRAConfig(rank=4, alpha=12.0, targets=targets, first_layer=first_layer)
    lora = lora_lib.init_lora(jax.random.key(seed), params, lcfg)
    rng = np.random.default_rng(seed)
    tree = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), lora.tree)
    return lcfg, lora_lib.LoRAParams(tree, lora.scale)


def _batch(seed, b=2, t=10, vocab=61):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    mask = (np.arange(t)[None, :] < np.array([t, t - 4])[:, None]).astype(np.int32)
    return ids, mask


def _is_lora(module):
    return hasattr(module, "lora_A")


@pytest.mark.parametrize("arch, targets, first_layer", [
    ("qwen2", r"layers/(attn|mlp)/.*/kernel", 1),
    ("llama", r"layers/attn/(q|v)/kernel", 0),
])
def test_decoder_adapter_loads_in_peft(tmp_path, arch, targets, first_layer):
    cls, conf = {"qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
                 "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig)}[arch]
    base_dir = _save_random(cls(conf(num_attention_heads=4, num_key_value_heads=2, **SMALL)), tmp_path / "base")
    cfg, params = decoder.load_hf(base_dir)
    lcfg, lora = _random_lora(params, targets, first_layer)
    out = peft_export.export_peft(tmp_path / "adapter", lora, lcfg, arch=arch, num_layers=cfg.num_layers,
                                  base_model_name_or_path=str(base_dir))
    hf_model = cls.from_pretrained(base_dir, attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(hf_model, out).eval()
    layers = hf_model.model.layers
    assert not _is_lora(layers[0].self_attn.q_proj) if first_layer else _is_lora(layers[0].self_attn.q_proj)
    assert _is_lora(layers[-1].self_attn.v_proj) and _is_lora(layers[-1].mlp.down_proj) == (arch == "qwen2")
    ids, mask = _batch(0)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(decoder.forward(cfg, params, ids, mask, lora))
    m = mask.astype(bool)
    base_only = np.asarray(decoder.forward(cfg, params, ids, mask))
    assert np.abs(base_only[m] - ref[m]).max() > 1e-2  # the adapter matters at this tolerance
    assert np.abs(ours[m] - ref[m]).max() < 1e-4


def test_bert_adapter_loads_in_peft(tmp_path):
    from mta_jax.model import encoder
    bert_conf = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=40, max_position_embeddings=16,
                                        attn_implementation="eager")
    base_dir = _save_random(transformers.BertModel(bert_conf), tmp_path / "base")
    cfg, params = encoder.load_hf(base_dir)
    ids, mask = _batch(1)
    m = mask.astype(bool)
    with torch.no_grad():
        plain = transformers.BertModel.from_pretrained(base_dir, attn_implementation="eager").eval()
        base_ref = plain(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    base_ours = np.asarray(encoder.hidden_states(cfg, params, ids, mask))
    assert np.abs(base_ours[m] - base_ref[m]).max() < 1e-4, "encoder != HF BertModel even without an adapter"
    # All kernels (suffix targeting), then the MLP down projection alone: its PEFT suffix
    # "output.dense" would also catch attention.output.dense, so the export must target exactly.
    for name, targets in [("all", r"layers/(attn|mlp)/.*/kernel"), ("down", r"layers/mlp/down/kernel")]:
        lcfg, lora = _random_lora(params, targets, first_layer=1)
        out = peft_export.export_peft(tmp_path / name, lora, lcfg, arch="bert", num_layers=cfg.num_layers,
                                      base_model_name_or_path=str(base_dir))
        hf_model = transformers.BertModel.from_pretrained(base_dir, attn_implementation="eager").eval()
        model = peft.PeftModel.from_pretrained(hf_model, out).eval()
        top = hf_model.encoder.layer[2]
        assert _is_lora(top.output.dense) and _is_lora(top.attention.output.dense) == (name == "all")
        assert not _is_lora(hf_model.encoder.layer[0].output.dense)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        merged = np.asarray(encoder.hidden_states(cfg, lora_lib.merge(params, lora), ids, mask))
        assert np.abs(merged[m] - base_ours[m]).max() > 1e-2  # the adapter matters at this tolerance
        assert np.abs(merged[m] - ref[m]).max() < 1e-4, "exported adapter != W + scale * a @ b"
        ours = np.asarray(encoder.hidden_states(cfg, params, ids, mask, lora))
        assert np.abs(ours[m] - ref[m]).max() < 1e-4, "encoder's LoRA forward != PEFT"


def test_adapter_config_fields(tmp_path):
    cfg = decoder.DecoderConfig(vocab_size=11, hidden_size=8, num_layers=4, num_heads=2, num_kv_heads=1,
                                head_dim=4, intermediate_size=8, arch="qwen2")
    params = jax.eval_shape(lambda k: decoder.init_params(cfg, k), jax.random.key(0))
    lcfg = lora_lib.LoRAConfig(rank=2, alpha=6.0, targets=r"layers/(attn/q|mlp/up)/kernel", first_layer=3)
    lora = jax.tree.map(np.zeros_like, lora_lib.init_lora(jax.random.key(0), params, lcfg))
    peft_export.export_peft(tmp_path, lora, lcfg, arch="qwen2", num_layers=4, base_model_name_or_path="x/y")
    conf = json.loads((tmp_path / peft_export.CONFIG_FILE).read_text())
    assert (conf["r"], conf["lora_alpha"], conf["layers_to_transform"]) == (2, 6.0, [3])
    assert sorted(conf["target_modules"]) == ["mlp.up_proj", "self_attn.q_proj"]
    assert conf["base_model_name_or_path"] == "x/y"
    # The config is one PEFT itself accepts, with the scaling we use.
    pconf = peft.LoraConfig.from_pretrained(tmp_path)
    assert pconf.lora_alpha / pconf.r == lcfg.scale and not pconf.use_rslora


def test_export_rejects_what_peft_cannot_represent(tmp_path):
    cfg = decoder.DecoderConfig(vocab_size=11, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                                head_dim=4, intermediate_size=8)
    params = jax.eval_shape(lambda k: decoder.init_params(cfg, k), jax.random.key(0))
    lcfg = lora_lib.LoRAConfig(rank=2, targets=r"layers/attn/q/kernel")
    lora = lora_lib.init_lora(jax.random.key(0), params, lcfg)
    kw = dict(num_layers=2, base_model_name_or_path="x")
    with pytest.raises(ValueError, match="unsupported arch 'gpt2'"):
        peft_export.export_peft(tmp_path, lora, lcfg, arch="gpt2", **kw)
    with pytest.raises(ValueError, match="layers/mlp/gate"):  # BERT has no gate projection
        glcfg = lora_lib.LoRAConfig(rank=2, targets=r"layers/mlp/gate/kernel")
        peft_export.export_peft(tmp_path, lora_lib.init_lora(jax.random.key(0), params, glcfg), glcfg,
                                arch="bert", **kw)
    with pytest.raises(ValueError, match="scale"):
        peft_export.export_peft(tmp_path, lora, lora_lib.LoRAConfig(rank=2, alpha=3.0), arch="llama", **kw)
    with pytest.raises(ValueError, match="first_layer=1"):
        peft_export.export_peft(tmp_path, lora, lora_lib.LoRAConfig(rank=2, first_layer=1), arch="llama", **kw)
    with pytest.raises(ValueError, match=r"expected \(L', in, 4\)"):
        peft_export.export_peft(tmp_path, lora, lora_lib.LoRAConfig(rank=4, alpha=32.0), arch="llama", **kw)
    embed_lora = lora_lib.LoRAParams({"lm_head": {"a": np.zeros((8, 2)), "b": np.zeros((2, 11))}}, lcfg.scale)
    with pytest.raises(ValueError, match="top-level keys"):
        peft_export.export_peft(tmp_path, embed_lora, lcfg, arch="llama", **kw)
    assert not (tmp_path / peft_export.CONFIG_FILE).exists()  # nothing half-written on error
