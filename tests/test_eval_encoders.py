"""The shared-bottom evaluation encoder equals the plain encoder, with and without LoRA, and caches per text."""
import jax
import numpy as np
import pytest

from mta_jax.data.tokenize import Tokenizer
from mta_jax.eval.encoders import SharedBottomEncoder
from mta_jax.model import encoder
from mta_jax.model import lora as lora_lib

TEXTS = ["weather", "book a table for two at an italian place tonight please",
         "a" * 10, "translate this sentence into french " * 6, "stock price of ACME"]


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.from_dir(encoder.default_model_dir())
    cfg = encoder.EncoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=3, num_heads=2,
                                intermediate_size=64)
    base = encoder.init_params(cfg, jax.random.key(1))
    adapter = lora_lib.init_lora(jax.random.key(2), base, lora_lib.LoRAConfig(rank=2, first_layer=1))
    adapter = jax.tree.map(lambda x: x + 0.1, adapter)  # non-zero B: LoRA changes the output
    return tok, cfg, base, adapter


@pytest.mark.parametrize("use_lora", [False, True])
def test_matches_full_forward(tiny, use_lora):
    tok, cfg, base, adapter = tiny
    lora = adapter if use_lora else None
    bank = SharedBottomEncoder(cfg, base, tok, first_layer=1, max_len=64, batch_size=2)
    got = bank.embed_fn(lora)(TEXTS)
    ids, mask = tok.encode(TEXTS, 64)
    want = np.asarray(encoder.encode(cfg, base, ids, mask, lora))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_lora_changes_embeddings_and_caches_are_per_text(tiny):
    tok, cfg, base, adapter = tiny
    bank = SharedBottomEncoder(cfg, base, tok, first_layer=1, max_len=64, batch_size=4)
    plain, adapted = bank.embed_fn(None), bank.embed_fn(adapter)
    a, b = plain(TEXTS), adapted(TEXTS)
    assert np.abs(a - b).max() > 1e-3
    assert len(bank._rows) == len(TEXTS)               # bottom computed once for both methods
    again = plain(list(reversed(TEXTS)))               # order and subsets come from the cache
    np.testing.assert_array_equal(again, a[::-1])
    with pytest.raises(ValueError, match="embed_fn: no texts"):
        plain([])


def test_pool_gradient_is_finite_for_all_padding_rows():
    h = jax.random.normal(jax.random.key(0), (3, 4, 8))
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])  # row 1: an empty (padding) doc
    g = jax.grad(lambda h: encoder.pool(h, mask)[0].sum() + encoder.pool(h, mask)[1].sum())(h)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(encoder.pool(h, mask)[1]), 0.0)
