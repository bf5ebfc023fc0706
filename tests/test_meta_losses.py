"""The candidate loss: cross-entropy for labelled items, entropy for unlabelled ones (label -1)."""
import jax
import numpy as np
import pytest

from mta_jax.meta import losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def test_labelled_items_give_the_mean_negative_log_likelihood():
    scores = np.random.default_rng(0).normal(size=(6, 5))
    labels = np.array([0, 4, 2, 2, 1, 3])
    loss, aux = losses.candidate_cross_entropy(scores, labels)
    want = -_log_softmax(scores)[np.arange(6), labels].mean()
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    np.testing.assert_allclose(aux["acc"], (scores.argmax(-1) == labels).mean())


def test_unlabelled_items_give_the_entropy_and_are_left_out_of_the_accuracy():
    scores = np.random.default_rng(1).normal(size=(4, 5)) * 3
    labels = np.array([-1, 3, -1, scores[3].argmax()])
    logp = _log_softmax(scores)
    per_item = [-(np.exp(logp[0]) * logp[0]).sum(), -logp[1, 3], -(np.exp(logp[2]) * logp[2]).sum(),
                -logp[3, labels[3]]]
    loss, aux = losses.candidate_cross_entropy(scores, labels)
    np.testing.assert_allclose(loss, np.mean(per_item), rtol=1e-12)
    # Only items 1 and 3 are labelled; item 3's label is its argmax, item 1's is right only by chance.
    np.testing.assert_allclose(aux["acc"], ((scores[1].argmax() == 3) + 1) / 2)


def test_entropy_gradient_sharpens_the_distribution():
    """One gradient step on the entropy of an unlabelled item raises its top candidate's probability."""
    scores = np.array([[1.0, 0.5, 0.0, -0.2]])
    grad = jax.grad(lambda s: losses.candidate_cross_entropy(s, np.array([-1]))[0])(scores)
    p = np.exp(_log_softmax(scores))
    np.testing.assert_allclose(grad, -p * (np.log(p) + (-(p * np.log(p)).sum())), rtol=1e-10)
    after = np.exp(_log_softmax(scores - 0.5 * np.asarray(grad)))
    assert after[0, 0] > p[0, 0]


def test_all_unlabelled_batch_reports_zero_accuracy_not_nan():
    loss, aux = losses.candidate_cross_entropy(np.zeros((3, 4)), np.full(3, -1))
    np.testing.assert_allclose(loss, np.log(4), rtol=1e-12)
    assert float(aux["acc"]) == 0.0


def test_no_items_give_zero_loss_not_nan():
    """An episode with ``support=0`` (allowed by EpisodeConfig) must not poison the logged losses."""
    loss, aux = losses.candidate_cross_entropy(np.zeros((0, 5)), np.zeros(0, np.int32))
    assert float(loss) == 0.0 and float(aux["acc"]) == 0.0
    g = jax.grad(lambda s: losses.candidate_cross_entropy(s, np.zeros(0, np.int32))[0])(np.zeros((0, 5)))
    assert g.shape == (0, 5)


def test_masked_candidates_get_no_probability_and_no_nan_in_the_entropy():
    scores = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    loss_fn = lambda s, y: losses.candidate_cross_entropy(jax.numpy.where(np.array([[1, 1, 0], [1, 1, 0]], bool), s, losses.MASKED_SCORE), y)[0]
    np.testing.assert_allclose(loss_fn(scores, np.array([0, -1])),
                               (np.log1p(np.exp(1.0)) + np.log(2)) / 2, rtol=1e-6)
    assert np.isfinite(jax.grad(loss_fn)(scores, np.array([-1, -1]))).all()
