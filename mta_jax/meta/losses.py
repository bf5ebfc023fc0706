"""Tool-selection losses: cross-entropy over each item's candidate tools, for the bi-encoder and the decoder.

Both losses have the signature the meta-learning core expects, ``loss_fn(params, base, batch) ->
(loss, aux)``, where ``params`` is the LoRA tree being adapted, ``base`` the frozen backbone and
``batch`` one meta-task's support or query set.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mta_jax.model import decoder
from mta_jax.model import encoder


MASKED_SCORE = -1e9  # the logit of a masked-out candidate: probability 0, no NaN in the entropy


def candidate_cross_entropy(scores: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean cross-entropy of ``scores [..., C]`` against gold positions ``labels [...]``.

    An item whose label is negative is *unlabelled*: it contributes the entropy of its candidate
    distribution instead, ``-sum_c p_c log p_c`` (test-time adaptation on queries without labels,
    as in entropy minimisation; Wang et al., 2021, "Tent"). Labelled and unlabelled items may mix.

    Returns:
      ``(loss, {"acc": top-1 accuracy over the labelled items (0 when none is)})``; ties in the
      argmax go to the first candidate (a training statistic; eval scores ties by their expectation).
    """
    scores = jnp.asarray(scores)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))  # bf16 -> f32; f64 stays
    logp = jax.nn.log_softmax(scores, axis=-1)
    labelled = labels >= 0
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    hit = (jnp.argmax(scores, axis=-1) == labels) & labelled
    acc = jnp.sum(hit) / jnp.maximum(jnp.sum(labelled), 1)
    per_item = jnp.where(labelled, nll, entropy)
    return per_item.sum() / max(per_item.size, 1), {"acc": acc.astype(scores.dtype)}  # 0 items: 0, not NaN


@dataclasses.dataclass(frozen=True)
class BiEncoderLoss:
    """Bi-encoder selection loss over one episode, on hidden states cached below the LoRA layers.

    A batch holds the episode's ``N`` tool docs once and its items as indices into them, so every
    doc is embedded once per inner step and shared by all items (the item count does not multiply
    the doc cost):

    * ``tool_h [N, Td, D]``, ``tool_mask [N, Td]``: hidden states of the docs after layer ``start``.
    * ``query_h [S, Tq, D]``, ``query_mask [S, Tq]``: the same for the item queries.
    * ``cands [S, C]``: each item's candidates as indices into the ``N`` docs; ``label [S]``: gold
      position, or -1 for an unlabelled item (its loss is the entropy, see :func:`candidate_cross_entropy`).
    * optional ``cand_mask [S, C]`` (bool): ``False`` drops a candidate from its item's softmax —
      padding of items with fewer than ``C`` candidates, or another gold tool of a multi-gold item.
    * optional ``scale []``: this task's inverse temperature, overriding :attr:`scale` (per-dataset
      temperatures, ``config.loss.dataset_scale``).

    Score = ``scale * cos(query, doc)`` (the sentence-transformers MultipleNegativesRanking recipe).

    Attributes:
      cfg: encoder configuration.
      start: first layer still to run (the frozen layers below it were cached).
      scale: inverse temperature of the cosine logits.
    """

    cfg: encoder.EncoderConfig
    start: int
    scale: float = 20.0

    def embed(self, lora, base: dict, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = encoder.run_layers(self.cfg, base, h, mask, lora=lora, start=self.start)
        return encoder.pool(h, mask)

    def __call__(self, lora, base: dict, batch: dict[str, Any]) -> tuple[jax.Array, dict]:
        docs = self.embed(lora, base, batch["tool_h"], batch["tool_mask"])      # [N, D]
        queries = self.embed(lora, base, batch["query_h"], batch["query_mask"])  # [S, D]
        sims = queries @ docs.T                                                  # [S, N]
        scale = batch["scale"] if "scale" in batch else self.scale
        scores = scale * jnp.take_along_axis(sims, batch["cands"], axis=-1)     # [S, C]
        if "cand_mask" in batch:  # finite, so that exp(logp) * logp stays 0 in the entropy
            scores = jnp.where(batch["cand_mask"], scores, MASKED_SCORE)
        return candidate_cross_entropy(scores, batch["label"])


def target_token_logprobs(cfg: decoder.DecoderConfig, base: dict, lora, ids: jax.Array, mask: jax.Array,
                          target_mask: jax.Array, max_target: int, *,
                          bottom: tuple[jax.Array, int] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of the first ``max_target`` target tokens of each sequence.

    Only the positions predicting a target token are projected to the vocabulary (``max_target``
    per row instead of ``T``), which is what makes a 150k-vocabulary decoder affordable.

    Args:
      cfg, base, lora: the decoder, its frozen weights and the adapter (None = base model).
      ids, mask, target_mask: ``[B, T]``; ``target_mask`` marks the target span (never token 0).
      max_target: static upper bound on target tokens per row (extra ones are ignored, so callers
        must check it on the host).
      bottom: shared frozen-bottom states of ``ids`` / ``mask`` (see ``decoder.hidden_states``).

    Returns:
      ``(logp, correct, valid)``, each ``[B, max_target]``: log p of each target token, whether it
      is the argmax, and whether the slot holds a target token at all.
    """
    tm = target_mask.astype(bool)
    # A stable sort on "not target" lists the target positions first, in sequence order.
    pos = jnp.argsort(~tm, axis=-1, stable=True)[:, :max_target]
    valid = jnp.take_along_axis(tm, pos, axis=-1)
    tokens = jnp.take_along_axis(ids, pos, axis=-1)
    h = decoder.hidden_states(cfg, base, ids, mask, lora, bottom=bottom)
    logp, logits = predicted_logprobs(cfg, base, h, jnp.maximum(pos - 1, 0), tokens)  # t-1 predicts t
    correct = jnp.argmax(logits, axis=-1) == tokens
    return jnp.where(valid, logp, 0.0), correct, valid


def predicted_logprobs(cfg: decoder.DecoderConfig, base: dict, h: jax.Array, prev: jax.Array,
                       tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log p(tokens)`` predicted by the hidden states at columns ``prev``, and those logits.

    Args:
      h: hidden states ``[B, T, D]``; ``prev``, ``tokens``: ``[B, K]`` (column of the predicting
        state, token it should predict). Only these ``K`` states are projected to the vocabulary.

    Returns:
      ``(logp [B, K], logits [B, K, V])``.
    """
    logits = decoder.lm_logits(cfg, base, jnp.take_along_axis(h, prev[..., None], axis=1))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
    return logp, logits


@dataclasses.dataclass(frozen=True)
class DecoderTargetLoss:
    """Cross-entropy on the target span (the gold tool's name) of prompt + target sequences.

    Batch: ``ids``, ``mask``, ``target_mask`` ``[S, L]`` (right padded, see
    :mod:`mta_jax.tasks.prompts`). Loss = mean NLL per target token over the batch; aux ``acc`` =
    fraction of sequences whose every target token is the argmax (greedy decoding would emit it).

    Attributes:
      cfg: decoder configuration.
      max_target: static bound on target tokens per sequence (``config.data.doc_len``).
    """

    cfg: decoder.DecoderConfig
    max_target: int

    def __call__(self, lora, base: dict, batch: dict[str, Any]) -> tuple[jax.Array, dict]:
        logp, correct, valid = target_token_logprobs(self.cfg, base, lora, batch["ids"], batch["mask"],
                                                     batch["target_mask"], self.max_target)
        nll = -jnp.sum(logp) / jnp.maximum(jnp.sum(valid), 1)
        acc = jnp.all(correct | ~valid, axis=-1).astype(jnp.float32).mean()
        return nll, {"acc": acc}
