"""Ranks a catalogue's tools for free-text queries (the ``select`` CLI's core): by cosine with any
embedding function (encoder runs), or by a decoder's constrained score of each tool's name."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mta_jax.data import records
from mta_jax.data import render
from mta_jax.eval.methods import EmbedFn
from mta_jax.eval.metrics import Scorer
from mta_jax.eval.sets import EvalItem, EvalSet


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
    return _ranked(q @ d.T, [t.tool_id for t in catalogue.tools], top_k)


def _ranked(scores, ids: Sequence[str], top_k: int | None) -> list[list[tuple[str, float]]]:
    """Per row of ``scores`` (one per query, one value per tool), ``(tool_id, score)`` best first;
    ties keep catalogue order."""
    out = []
    for row in scores:
        row = np.asarray(row, np.float64)
        order = np.argsort(-row, kind="stable")[:top_k]
        out.append([(ids[i], float(row[i])) for i in order])
    return out


def rank_tools_by_scorer(scorer: Scorer, catalogue: records.Catalogue, queries: Sequence[str],
                         top_k: int | None = None) -> list[list[tuple[str, float]]]:
    """Ranks every tool of ``catalogue`` for each query with an eval :data:`Scorer`, best first.

    For decoder runs: each query becomes one item whose candidates are the whole catalogue (the
    prompt lists them all, in an order seeded by the query's position, as evaluation does) and
    the scorer's value of each candidate (e.g. ``log p(" name" + eos | prompt)``) ranks it.

    Returns:
      One list per query of ``(tool_id, score)``; ties keep catalogue order.
    """
    if not queries:
        raise ValueError("rank_tools_by_scorer: no queries")
    ids = tuple(t.tool_id for t in catalogue.tools)
    items = tuple(EvalItem(f"query{i}", q, (), ids) for i, q in enumerate(queries))
    (scores,) = scorer([EvalSet("select", "select", catalogue, items)])
    return _ranked(scores, ids, top_k)
