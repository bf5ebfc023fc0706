"""TokenTable building/caching and the prefetch thread."""
import numpy as np
import pytest

from mta_jax.tasks import batching


class CountingTokenizer:
    """Word-hash tokenizer that counts calls (to prove the cache is used)."""

    def __init__(self):
        self.calls = 0

    def encode(self, texts, max_len):
        self.calls += 1
        ids = np.zeros((len(texts), max_len), np.int32)
        for i, t in enumerate(texts):
            w = [sum(map(ord, x)) % 1000 + 1 for x in t.split()][:max_len]
            ids[i, :len(w)] = w
        return ids, (ids > 0).astype(np.int32)


def test_token_table_rows_and_take(tmp_path):
    tok = CountingTokenizer()
    texts = ["a b c", "d", "e f"]
    t = batching.build_token_table(texts, tok, 4, chunk=2)
    assert tok.calls == 2 and len(t) == 3
    ref_ids, ref_mask = tok.encode(texts, 4)
    np.testing.assert_array_equal(t.ids, ref_ids)
    ids, mask = t.take(np.array([[2, 0]]))
    assert ids.shape == (1, 2, 4)
    np.testing.assert_array_equal(ids[0, 0], ref_ids[2])
    np.testing.assert_array_equal(mask[0, 1], ref_mask[0])


def test_token_table_cache(tmp_path):
    tok = CountingTokenizer()
    a = batching.build_token_table(["x y", "z"], tok, 3, cache_dir=tmp_path, tokenizer_id="tok1")
    b = batching.build_token_table(["x y", "z"], tok, 3, cache_dir=tmp_path, tokenizer_id="tok1")
    assert tok.calls == 1 and np.array_equal(a.ids, b.ids)
    batching.build_token_table(["x y", "z"], tok, 3, cache_dir=tmp_path, tokenizer_id="tok2")
    batching.build_token_table(["x y", "z"], tok, 4, cache_dir=tmp_path, tokenizer_id="tok1")
    batching.build_token_table(["x y", "w"], tok, 3, cache_dir=tmp_path, tokenizer_id="tok1")
    assert tok.calls == 4  # another tokenizer, length or text each miss the cache
    with pytest.raises(ValueError, match="tokenizer_id"):
        batching.build_token_table(["x"], tok, 3, cache_dir=tmp_path)


def test_token_table_bad_input():
    with pytest.raises(ValueError, match="text 1 is empty"):
        batching.build_token_table(["ok", " "], CountingTokenizer(), 3)

    class Wrong:
        def encode(self, texts, max_len):
            return np.zeros((len(texts), max_len + 1)), np.zeros((len(texts), max_len + 1))
    with pytest.raises(ValueError, match="expected"):
        batching.build_token_table(["ok"], Wrong(), 3)


def test_prefetch_order_and_errors():
    assert list(batching.prefetch(iter(range(50)), 3)) == list(range(50))

    def boom():
        yield 1
        raise RuntimeError("producer failed")
    it = batching.prefetch(boom(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="producer failed"):
        next(it)
    with pytest.raises(ValueError):
        list(batching.prefetch(iter([]), 0))
