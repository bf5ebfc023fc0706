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

from mta_jax.model import encoder


def candidate_cross_entropy(scores: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean cross-entropy of ``scores [..., C]`` against gold positions ``labels [...]``.

    Returns:
      ``(loss, {"acc": top-1 accuracy})``; ties in the argmax go to the first candidate, as in eval.
    """
    scores = scores.astype(jnp.float32)
    logp = jax.nn.log_softmax(scores, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    acc = (jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32)
    return nll.mean(), {"acc": acc.mean()}


@dataclasses.dataclass(frozen=True)
class BiEncoderLoss:
    """Bi-encoder selection loss over one episode, on hidden states cached below the LoRA layers.

    A batch holds the episode's ``N`` tool docs once and its items as indices into them, so every
    doc is embedded once per inner step and shared by all items (the item count does not multiply
    the doc cost):

    * ``tool_h [N, Td, D]``, ``tool_mask [N, Td]``: hidden states of the docs after layer ``start``.
    * ``query_h [S, Tq, D]``, ``query_mask [S, Tq]``: the same for the item queries.
    * ``cands [S, C]``: each item's candidates as indices into the ``N`` docs; ``label [S]``: gold position.

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
        scores = self.scale * jnp.take_along_axis(sims, batch["cands"], axis=-1)  # [S, C]
        return candidate_cross_entropy(scores, batch["label"])
