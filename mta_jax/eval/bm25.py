"""Okapi BM25 (Robertson & Zaragoza, 2009) over tool documents, our own implementation.

For a query ``q`` and document ``d``::

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with ``N``, ``df`` and ``avgdl`` taken over the corpus the index is built on (an eval set's whole
catalogue), so candidate lists are scored with catalogue-level statistics. The idf is the
non-negative Lucene form (the classic ``ln((N - df + 0.5) / (df + 0.5))`` goes negative for
terms in more than half the documents, which would reward documents for *lacking* common words).
Query terms count with multiplicity (``k3 -> inf`` in Robertson's formula).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Sequence

import numpy as np

# camelCase / PascalCase boundaries: tool names such as ``getHealthWorkforce`` carry their words
# only in the casing.
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_WORD = re.compile(r"[^\W_]+")  # letters/digits of any script; "_", "." and "/" separate words


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens; camelCase and snake_case names are split into their words."""
    return [w.lower() for w in _WORD.findall(_CAMEL.sub(" ", text))]


@dataclasses.dataclass(frozen=True)
class BM25Config:
    """BM25 hyper-parameters: ``k1`` (tf saturation) and ``b`` (length normalisation)."""

    k1: float = 1.5
    b: float = 0.75


@dataclasses.dataclass(frozen=True)
class BM25Index:
    """Corpus statistics plus per-document term counts.

    Attributes:
      ids: document ids, in corpus order.
      tfs: per document, its term -> count.
      lengths: document lengths in tokens.
      idf: term -> idf over the corpus.
      avgdl: mean document length.
      config: the hyper-parameters.
    """

    ids: tuple[str, ...]
    tfs: tuple[dict, ...]
    lengths: np.ndarray
    idf: dict
    avgdl: float
    config: BM25Config

    def position(self) -> dict[str, int]:
        """Document id -> row."""
        return {d: i for i, d in enumerate(self.ids)}


def build_index(ids: Sequence[str], texts: Sequence[str],
                config: BM25Config = BM25Config()) -> BM25Index:
    """Tokenises ``texts`` and computes document frequencies and lengths.

    Raises:
      ValueError: ids and texts differ in length, ids repeat, or the corpus is empty.
    """
    if len(ids) != len(texts):
        raise ValueError(f"BM25: {len(ids)} ids but {len(texts)} texts")
    if len(set(ids)) != len(ids):
        raise ValueError("BM25: document ids must be unique")
    if not ids:
        raise ValueError("BM25: empty corpus")
    tfs = tuple(collections.Counter(tokenize(t)) for t in texts)
    df = collections.Counter(term for tf in tfs for term in tf)
    n = len(ids)
    idf = {t: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
    lengths = np.array([sum(tf.values()) for tf in tfs], dtype=np.float64)
    avgdl = float(lengths.mean()) or 1.0  # an all-empty corpus scores 0 everywhere anyway
    return BM25Index(tuple(ids), tfs, lengths, idf, avgdl, config)


def score(index: BM25Index, query: str, rows: Sequence[int]) -> np.ndarray:
    """BM25 scores of ``query`` against the documents at ``rows`` (float64, one per row)."""
    k1, b = index.config.k1, index.config.b
    terms = tokenize(query)
    out = np.zeros(len(rows), dtype=np.float64)
    for j, r in enumerate(rows):
        tf, norm = index.tfs[r], k1 * (1.0 - b + b * index.lengths[r] / index.avgdl)
        for t in terms:
            f = tf.get(t, 0)
            if f:
                out[j] += index.idf[t] * f * (k1 + 1.0) / (f + norm)
    return out
