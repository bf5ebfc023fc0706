"""Ranks a catalogue's tools for free-text queries with any embedding function (the ``select`` CLI's core)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mta_jax.data import records
from mta_jax.data import render
from mta_jax.eval.methods import EmbedFn


def rank_tools(embed_fn: EmbedFn, catalogue: records.Catalogue, queries: Sequence[str],
               doc_style: str = "name_desc", top_k: int | None = None) -> list[list[tuple[str, float]]]:
    """Scores every tool of ``catalogue`` for each query by cosine similarity, best first.

    Args:
      embed_fn: ``texts -> [N, D]`` embeddings (normalised here).
      catalogue: the candidate tools.
      queries: user requests.
      doc_style: tool rendering (a key of ``render.TOOL_TEXT_STYLES``).
      top_k: keep only the best ``k`` per query (all when None).

    Returns:
      One list per query of ``(tool_id, cosine)``; ties keep catalogue order.
    """
    if not queries:
        raise ValueError("rank_tools: no queries")
    docs = [render.tool_text(t, style=doc_style) for t in catalogue.tools]
    emb = np.asarray(embed_fn(list(queries) + docs), np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    q, d = emb[:len(queries)], emb[len(queries):]
    out = []
    for row in q @ d.T:
        order = np.argsort(-row, kind="stable")[:top_k]
        out.append([(catalogue.tools[i].tool_id, float(row[i])) for i in order])
    return out
