"""Within-task transfer from training logs (``mta_jax.train.metrics.within_task_transfer``)."""
import numpy as np
import pytest

from mta_jax.train import metrics


def _rows(pre, post, query):
    return [{"step": 10 * (i + 1), "inner/loss_pre": a, "inner/loss_post": b, "outer/query_loss": c}
            for i, (a, b, c) in enumerate(zip(pre, post, query))]


def test_transfer_is_the_share_of_the_support_drop_seen_on_the_queries():
    pre, post, query = [1.0, 0.8, 0.6], [0.5, 0.4, 0.2], [0.9, 0.6, 0.5]
    t = metrics.within_task_transfer(_rows(pre, post, query))
    assert t.rows == 3
    np.testing.assert_allclose(t.support_drop, 0.8 - 1.1 / 3)
    gain = np.array(pre) - np.array(query)
    np.testing.assert_allclose(t.query_gain, gain.mean())
    np.testing.assert_allclose(t.fraction, gain.mean() / (0.8 - 1.1 / 3))
    np.testing.assert_allclose(t.gain_sem, gain.std(ddof=1) / np.sqrt(3))
    # from_step drops the early rows.
    late = metrics.within_task_transfer(_rows(pre, post, query), from_step=20)
    assert late.rows == 2
    np.testing.assert_allclose(late.fraction, (0.2 + 0.1) / (0.4 + 0.4))


def test_logs_without_the_query_key_recover_it_from_the_objective():
    pre, post, query = np.array([1.0, 0.7]), np.array([0.4, 0.3]), np.array([0.8, 0.5])
    rows = _rows(pre, post, query)
    want = metrics.within_task_transfer(rows)
    for r in rows:
        del r["outer/query_loss"]
    maml = [dict(r, **{"outer/loss": q + 0.5 * p}) for r, p, q in zip(rows, pre, query)]
    got = metrics.within_task_transfer(maml, algorithm="maml", support_weight=0.5)
    np.testing.assert_allclose(got.fraction, want.fraction)
    pooled = [dict(r, **{"outer/loss": 0.5 * (p + q)}) for r, p, q in zip(rows, pre, query)]
    np.testing.assert_allclose(metrics.query_losses(pooled, "pooled", 0.0), query)
    with pytest.raises(ValueError, match="'reptile'"):
        metrics.within_task_transfer(maml, algorithm="reptile")
    # Where the key and the objective both exist they must agree: a wrong weight is named.
    both = [dict(r, **{"outer/query_loss": q}) for r, q in zip(maml, query)]
    np.testing.assert_allclose(metrics.query_losses(both, "maml", 0.5), query)
    with pytest.raises(ValueError, match="step 10: outer/query_loss 0.800000 but outer/loss implies 0.300000"):
        metrics.query_losses(both, "maml", 1.0)


def test_pooled_runs_have_no_fraction_and_bad_rows_are_named():
    t = metrics.within_task_transfer(_rows([0.5, 0.6], [0.5, 0.6], [0.52, 0.58]))
    assert t.fraction is None and abs(t.query_gain) < 1e-9
    with pytest.raises(ValueError, match="no metrics rows at or after step 100"):
        metrics.within_task_transfer(_rows([1.0], [0.5], [0.8]), from_step=100)
    bad = _rows([1.0, 0.9], [0.5, 0.4], [0.8, 0.7])
    del bad[1]["inner/loss_post"]
    with pytest.raises(ValueError, match=r"step 20 has no \['inner/loss_post'\]"):
        metrics.within_task_transfer(bad)
    del bad[0]["outer/query_loss"]
    with pytest.raises(ValueError, match=r"step 10 has no outer/query_loss and no \['outer/loss'\]"):
        metrics.query_losses(bad, "maml", 1.0)


def test_the_maml_family_is_the_registry_s():
    """Every registered algorithm is either in MAML_FAMILY (objective L_q + w L_s, support_weight
    allowed) or refuses a support weight."""
    from mta_jax import meta
    for name in meta.ALGORITHMS:
        inner = meta.InnerConfig(adapt_pattern=".*" if name == "anil" else None)
        if name in metrics.MAML_FAMILY:
            meta.MetaConfig(name=name, inner=inner, support_weight=1.0)
        else:
            with pytest.raises(ValueError, match="support_weight applies to the MAML family"):
                meta.MetaConfig(name=name, inner=inner, support_weight=1.0)
    assert set(metrics.MAML_FAMILY) <= set(meta.ALGORITHMS)
