"""Zero-shot embed path (tokenise, truncate to 256, bucket, encode, pool) vs sentence-transformers, real weights."""
import numpy as np
import pytest

LONG = "Generate API Request: " + " ".join(f"user asks about item number {i} in the order" for i in range(60))
TEXTS = ["getHealthWorkforce: Retrieve information about the number of nurses in a specific country.",
         "Can I find academic research papers on this topic?", LONG, "hi", "请问北京的当前天气状况如何？"]


def test_zero_shot_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("torch")
    from mta_jax.data.tokenize import Tokenizer
    from mta_jax.eval import methods
    from mta_jax.model import encoder

    try:
        model_dir = encoder.default_model_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cfg, params = encoder.load_hf(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    assert tok.seq_lengths([LONG])[0] > 256  # the long text exercises truncation
    embed = methods.make_encoder_embed_fn(cfg, params, tok, max_len=256, batch_size=4, buckets=(32,))
    ours = embed(TEXTS)
    ref = st.SentenceTransformer(str(model_dir), device="cpu")
    assert ref.max_seq_length == 256
    theirs = ref.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    # cosines, which decide the choice, agree too
    np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=2e-5)
