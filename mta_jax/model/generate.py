"""Greedy decoding for the Llama / Qwen2 decoder, by full re-forward per new token (no KV cache).

Tool names are a handful of tokens, so re-running the whole (prompt + generated) sequence for each
new token costs ``max_new_tokens`` forwards of a short sequence; a KV cache would need a second
attention path in :mod:`mta_jax.model.decoder` and is left out on purpose. Shapes are fixed: the
buffer is ``[B, P + max_new_tokens]`` from the start, and the causal mask makes the not yet written
slots invisible to the positions that matter, so one compiled ``while_loop`` serves every step.
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
    buf = jnp.concatenate([ids.astype(jnp.int32), jnp.zeros((b, n), jnp.int32)], axis=1)
    # Unwritten slots are marked real: they sit after every position we read, so causality hides them.
    full_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.ones((b, n), jnp.int32)], axis=1)
    eos = -1 if eos_id is None else int(eos_id)

    def cond(carry):
        i, _, done = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, buf, done = carry
        h = decoder.hidden_states(cfg, params, buf, full_mask, lora)
        last = jax.lax.dynamic_slice_in_dim(h, p - 1 + i, 1, axis=1)[:, 0]
        nxt = jnp.argmax(decoder.lm_logits(cfg, params, last), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, jnp.int32(max(eos, 0)), nxt)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], p + i, axis=1)
        return i + 1, buf, done | (nxt == eos)

    i, buf, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), buf, jnp.zeros((b,), bool)))
    tokens = buf[:, p:]
    # valid: up to and including the first eos, and only the steps actually run.
    is_eos = tokens == eos
    before = jnp.cumsum(is_eos, axis=1) - is_eos == 0
    valid = before & (jnp.arange(n)[None, :] < i)
    return tokens, valid
