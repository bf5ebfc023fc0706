"""Greedy decoding for the Llama / Qwen2 decoder with a key/value cache.

One prefill runs the prompts and fills the cache (:func:`mta_jax.model.decoder.decode`); each
step then runs only the newest token against it, so a step costs one token's forward instead of
the whole sequence's. Shapes are fixed: the cache holds ``P + max_new_tokens`` slots from the
start and causality hides the slots not yet written, so one compiled ``while_loop`` serves every
step. (Until session 15 every step re-ran the whole sequence; ``tests/test_decoder_e2e.py`` keeps
that per-token re-forward as the reference the cached decoder must equal.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mta_jax.model import decoder
from mta_jax.model.lora import LoRAParams


def greedy(cfg: decoder.DecoderConfig, params: dict, ids: jax.Array, mask: jax.Array, max_new_tokens: int,
           eos_id: int | None, lora: LoRAParams | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation of left-padded prompts.

    Args:
      cfg, params, lora: the decoder (as in :func:`mta_jax.model.decoder.forward`).
      ids, mask: ``[B, P]`` prompts, **left** padded (every row's last column is a real token).
      max_new_tokens: static number of decoding steps at most.
      eos_id: generation of a row stops after it emits this token (None: never stops early).

    Returns:
      ``(tokens, valid)``, ``[B, max_new_tokens]`` int32 / bool: the generated ids and whether each
      was generated before (or is) the row's eos. The loop exits early once every row is done.

    Raises:
      ValueError: the prompts are not left padded (checked when ``mask`` is concrete).
    """
    if not isinstance(mask, jax.core.Tracer) and not np.asarray(mask)[:, -1].all():
        raise ValueError("greedy: prompts must be left padded (mask[:, -1] must be all 1)")
    b, p = ids.shape
    n = max_new_tokens
    mask = jnp.asarray(mask).astype(jnp.int32)
    # Generated slots are real keys; causality hides each one until it is written.
    key_mask = jnp.concatenate([mask, jnp.ones((b, n), jnp.int32)], axis=1)
    eos = -1 if eos_id is None else int(eos_id)
    h, cache = decoder.decode(cfg, params, jnp.asarray(ids, jnp.int32), decoder.mask_positions(mask),
                              decoder.init_cache(cfg, b, p + n), 0, key_mask, lora)
    length = jnp.sum(mask, axis=-1)  # the rotary position of the first generated token

    def cond(carry):
        i, *_, done = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, last, out, cache, done = carry
        nxt = jnp.argmax(decoder.lm_logits(cfg, params, last), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, jnp.int32(max(eos, 0)), nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        # Feed it (after the last step too: one spare token's forward, no branch in the loop).
        h, cache = decoder.decode(cfg, params, nxt[:, None], (length + i)[:, None], cache, p + i, key_mask, lora)
        return i + 1, h[:, 0], out, cache, done | (nxt == eos)

    init = (jnp.int32(0), h[:, -1], jnp.zeros((b, n), jnp.int32), cache, jnp.zeros((b,), bool))
    i, _, tokens, _, _ = jax.lax.while_loop(cond, body, init)
    # valid: up to and including the first eos, and only the steps actually run.
    is_eos = tokens == eos
    before = jnp.cumsum(is_eos, axis=1) - is_eos == 0
    valid = before & (jnp.arange(n)[None, :] < i)
    return tokens, valid
