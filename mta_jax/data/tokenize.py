"""Batch tokenisation to fixed-length int32 id / mask arrays, matching the HF fast tokenizers exactly.

Wraps ``tokenizers.Tokenizer`` (from a model folder's ``tokenizer.json``) without importing
transformers. Truncation is done by the Rust tokenizer itself (so the special-token budget is the
model's own post-processor's, e.g. ``[CLS] ... [SEP]`` for BERT or a BOS for Llama); padding is done
here, on either side, so the wrapped tokenizer's baked-in padding settings never leak in.
"""
from __future__ import annotations

import json
import pathlib
import threading
from typing import Sequence

import numpy as np
import tokenizers

PAD_SIDES = ("right", "left")


def _token_content(value) -> str | None:
    """A special token as written in ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A fast tokenizer plus its padding token.

    Args:
      tok: the Rust tokenizer (its own truncation / padding settings are ignored).
      pad_token: the padding token string; must be in the vocabulary.
      source: where the tokenizer came from (for error messages).
    """

    def __init__(self, tok: tokenizers.Tokenizer, pad_token: str, source: str = "<tokenizer>"):
        self._tok = tok
        # encode() sets the Rust tokenizer's truncation per call; the lock makes that atomic, so one
        # instance can serve several threads (e.g. a prefetch thread beside the main loop).
        self._lock = threading.Lock()
        self._tok.no_padding()
        self._tok.no_truncation()
        self.source = source
        self.pad_token = pad_token
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{source}: pad token {pad_token!r} is not in the vocabulary")
        self.pad_id = int(pad_id)

    @classmethod
    def from_dir(cls, path: str | pathlib.Path, pad_token: str | None = None) -> "Tokenizer":
        """Loads ``<path>/tokenizer.json``.

        The pad token is, in order: ``pad_token``; ``pad_token`` of ``tokenizer_config.json`` or
        ``special_tokens_map.json``; the padding token baked into ``tokenizer.json``; else the
        ``eos_token`` (decoder checkpoints such as Llama ship none; padded positions are masked, so the
        choice does not change results).

        Raises:
          FileNotFoundError: no ``tokenizer.json``.
          ValueError: no pad token can be determined, or it is not in the vocabulary.
        """
        d = pathlib.Path(path)
        file = d / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json in {d}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"{file}: cannot parse tokenizer ({e})") from e
        if pad_token is None:
            pad_token = _find_pad_token(d, tok)
        return cls(tok, pad_token, source=str(file))

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens (``len(hf_tokenizer)``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """The id of ``token``.

        Raises:
          KeyError: the token is not in the vocabulary.
        """
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.source}: token {token!r} is not in the vocabulary")
        return int(i)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence (padding and, by default, other special tokens dropped)."""
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=skip_special_tokens)

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Untruncated, unpadded ids of each text (batched in Rust)."""
        texts = _check_texts(texts)
        with self._lock:
            self._tok.no_truncation()
            encs = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def encode(self, texts: Sequence[str], max_len: int, *, pad_side: str = "right",
               add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Ids and attention mask, truncated and padded to ``max_len``.

        Identical to a HF fast tokenizer called with ``truncation=True, max_length=max_len,
        padding="max_length"`` (and ``padding_side=pad_side``): special tokens count towards
        ``max_len`` and the text is cut on the right.

        Args:
          texts: the strings to encode.
          max_len: output length (must leave room for the special tokens).
          pad_side: ``"right"`` (encoders) or ``"left"`` (decoders, so the last token is real).
          add_special_tokens: apply the model's post-processor (``[CLS]``/``[SEP]``, BOS, ...).

        Returns:
          ``(ids, mask)``, both int32 ``[len(texts), max_len]``; ``mask`` is 1 on real tokens.
        """
        if pad_side not in PAD_SIDES:
            raise ValueError(f"pad_side={pad_side!r}; expected one of {PAD_SIDES}")
        texts = _check_texts(texts)
        n_special = self._tok.num_special_tokens_to_add(False) if add_special_tokens else 0
        if max_len < max(n_special, 1):
            raise ValueError(f"max_len={max_len} leaves no room for text ({n_special} special tokens)")
        with self._lock:  # truncation is tokenizer state: set, encode and reset as one step
            self._tok.enable_truncation(max_len)
            try:
                encs = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
            finally:
                self._tok.no_truncation()
        ids = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_len), np.int32)
        for row, e in enumerate(encs):
            n = len(e.ids)
            cols = slice(0, n) if pad_side == "right" else slice(max_len - n, max_len)
            ids[row, cols] = e.ids
            mask[row, cols] = 1
        return ids, mask

    def seq_lengths(self, texts: Sequence[str], add_special_tokens: bool = True) -> np.ndarray:
        """Untruncated token counts (special tokens included): for choosing ``max_len``."""
        return np.array([len(i) for i in self.tokenize(texts, add_special_tokens)], np.int64)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
    return texts


def _find_pad_token(d: pathlib.Path, tok: tokenizers.Tokenizer) -> str:
    configs = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / name
        if f.is_file():
            try:
                configs[name] = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from e
    for conf in configs.values():
        pad = _token_content(conf.get("pad_token"))
        if pad:
            return pad
    if tok.padding is not None and tok.padding.get("pad_token"):
        return tok.padding["pad_token"]
    for conf in configs.values():
        eos = _token_content(conf.get("eos_token"))
        if eos:
            return eos
    raise ValueError(f"{d}: no pad_token or eos_token in tokenizer_config.json / special_tokens_map.json / "
                     "tokenizer.json; pass pad_token=... explicitly")
