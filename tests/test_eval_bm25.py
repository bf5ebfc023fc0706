"""BM25 against hand-computed scores on a 3-doc corpus, and the tokeniser."""
import math

import numpy as np
import pytest

from mta_jax.eval import bm25


def test_tokenize_splits_case_and_separators():
    assert bm25.tokenize("getHealthWorkforce") == ["get", "health", "workforce"]
    assert bm25.tokenize("math.triangle_area_heron: Area, of (3) sides!") == [
        "math", "triangle", "area", "heron", "area", "of", "3", "sides"]
    assert bm25.tokenize("HTMLParser v2") == ["html", "parser", "v2"]


def test_bm25_hand_computed_three_docs():
    docs = ["cat sat mat", "dog sat", "cat cat dog run"]
    idx = bm25.build_index(["d1", "d2", "d3"], docs, bm25.BM25Config(k1=1.5, b=0.75))
    # N = 3, lengths 3, 2, 4 -> avgdl 3; df(cat) = df(dog) = 2, df(run) = 1
    idf2 = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    idf1 = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    norm = lambda dl: 1.5 * (1 - 0.75 + 0.75 * dl / 3)
    expected = [
        idf2 * 1 * 2.5 / (1 + norm(3)),                                   # d1: cat x1
        idf2 * 1 * 2.5 / (1 + norm(2)),                                   # d2: dog x1
        idf2 * 2 * 2.5 / (2 + norm(4)) + idf2 * 1 * 2.5 / (1 + norm(4))   # d3: cat x2, dog x1
        + idf1 * 1 * 2.5 / (1 + norm(4)),                                 #     run x1
    ]
    got = bm25.score(idx, "Cat DOG run", [0, 1, 2])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # rows select and order the documents; unknown words score nothing
    np.testing.assert_allclose(bm25.score(idx, "cat dog run", [2, 0]), [expected[2], expected[0]])
    np.testing.assert_array_equal(bm25.score(idx, "zebra", [0, 1, 2]), 0.0)
    # query terms count with multiplicity
    np.testing.assert_allclose(bm25.score(idx, "sat sat", [1]), 2 * bm25.score(idx, "sat", [1]))


def test_bm25_b_zero_ignores_length():
    idx = bm25.build_index(["short", "long"], ["cat", "cat a b c d e f"], bm25.BM25Config(b=0.0))
    s = bm25.score(idx, "cat", [0, 1])
    assert s[0] == pytest.approx(s[1])


def test_bm25_bad_corpus():
    with pytest.raises(ValueError, match="unique"):
        bm25.build_index(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        bm25.build_index(["a", "b"], ["x"])
