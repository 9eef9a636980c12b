"""The MLM + NSP loss, ELECTRA's corrupted rows and loss, and the classification figures
against numpy references."""

import jax
import numpy as np
import pytest

from jaxllm.trainers.classify_eval import classification_figures
from jaxllm.training.losses import (
    cross_entropy,
    electra_corrupt,
    electra_loss_terms,
    mlm_nsp_loss,
)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_mlm_nsp_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b, m, v = 4, 5, 37
    mlm = rng.normal(size=(b, m, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, (b, m))
    weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0] * 5], np.float32)
    nsp = rng.normal(size=(b, 2)).astype(np.float32)
    labels = np.array([0, 1, 1, 0])
    rows = np.array([1, 1, 1, 0], np.float32)  # the last row is padding
    loss, aux = jax.jit(mlm_nsp_loss)(mlm, targets, weights, nsp, labels, rows)

    nll = -np.take_along_axis(log_softmax(mlm), targets[..., None], -1)[..., 0]
    per_row = (nll * weights).sum(1) / np.maximum(weights.sum(1), 1)
    nsp_nll = -log_softmax(nsp)[np.arange(b), labels]
    want = {
        "mlm_loss": per_row.sum(),
        "mlm_accuracy": (
            ((mlm.argmax(-1) == targets) * weights).sum(1) / np.maximum(weights.sum(1), 1)
        ).sum(),  # fmt: skip
        "nsp_loss": (nsp_nll * rows).sum(),
        "mlm_ce": (nll * weights).sum(),
        "mlm_correct": ((mlm.argmax(-1) == targets) * weights).sum(),
        "mlm_tokens": weights.sum(),
        "nsp_accuracy": ((nsp.argmax(-1) == labels) * rows).sum(),
        "weight": rows.sum(),
    }
    assert float(loss) == pytest.approx(want["mlm_loss"] + want["nsp_loss"], rel=1e-5)
    assert set(aux) == set(want)
    for k, value in want.items():
        assert float(aux[k]) == pytest.approx(value, rel=1e-5, abs=1e-6), k
    # without NSP (RoBERTa): the MLM term alone, the same figures
    loss_mlm, aux_mlm = mlm_nsp_loss(mlm, targets, weights, nsp, labels, rows, nsp=False)
    assert float(loss_mlm) == pytest.approx(want["mlm_loss"], rel=1e-5)
    assert set(aux_mlm) == set(want) - {"nsp_loss", "nsp_accuracy"}  # no NSP head trained
    assert float(aux_mlm["mlm_accuracy"]) == pytest.approx(want["mlm_accuracy"], rel=1e-5)
    # the gradient of the summed loss: softmax - onehot, scaled by each row's 1/n on its tokens
    grad = jax.grad(lambda x: mlm_nsp_loss(x, targets, weights, nsp, labels, rows)[0])(mlm)
    onehot = np.eye(v)[targets]
    scale = weights / np.maximum(weights.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(grad, (np.exp(log_softmax(mlm)) - onehot) * scale[..., None],
                               atol=1e-6)  # fmt: skip


def test_classification_loss_is_cross_entropy_over_real_rows():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])
    weights = np.array([1, 1, 1, 1, 0], np.float32)
    loss, aux = cross_entropy(logits, labels, weights)
    nll = -log_softmax(logits)[np.arange(5), labels]
    assert float(loss) == pytest.approx((nll * weights).sum(), rel=1e-6)
    assert float(aux["weight"]) == 4


def reference_macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    """scikit-learn's macro F1: the labels seen in either array, F1 = 2PR / (P + R)."""
    scores = []
    for c in sorted(set(y) | set(p)):
        tp = np.sum((y == c) & (p == c))
        prec = tp / max(np.sum(p == c), 1)
        rec = tp / max(np.sum(y == c), 1)
        scores.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    return float(np.mean(scores))


def test_classification_figures_match_a_reference():
    rng = np.random.default_rng(2)
    for n_classes in (2, 3, 5):
        y = rng.integers(0, n_classes, 200)
        p = np.where(rng.random(200) < 0.6, y, rng.integers(0, n_classes, 200))
        f = classification_figures(y, p, n_classes)
        assert f["accuracy"] == pytest.approx(np.mean(y == p))
        assert f["macro_f1"] == pytest.approx(reference_macro_f1(y, p))
        conf = np.array(f["confusion"])
        assert conf.sum() == 200 and np.trace(conf) == np.sum(y == p)
        assert conf[1].sum() == np.sum(y == 1) and conf[:, 0].sum() == np.sum(p == 0)
    # a label never seen nor predicted does not count; one only predicted counts as F1 0
    f = classification_figures(np.array([0, 0, 1]), np.array([0, 2, 1]), 4)
    assert f["macro_f1"] == pytest.approx(reference_macro_f1(np.array([0, 0, 1]),
                                                             np.array([0, 2, 1])))  # fmt: skip
    assert f["confusion"][0] == [1, 0, 1, 0]


def test_corrupt_puts_samples_at_the_chosen_positions_only():
    # masked rows as the data pipeline makes them: 7 = [MASK]; row 1's 9 is a "random" swap
    tokens = np.array([[2, 7, 11, 7, 3, 0], [2, 12, 9, 3, 0, 0]])
    positions = np.array([[1, 3, 0], [2, 0, 0]])  # padding entries point at 0, weight 0
    targets = np.array([[20, 21, 0], [22, 0, 0]])
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    sampled = np.array([[20, 30, 40], [31, 41, 42]])  # position 1's sample is the original
    corrupted, labels = jax.jit(electra_corrupt)(tokens, positions, targets, weights, sampled)
    np.testing.assert_array_equal(corrupted, [[2, 20, 11, 30, 3, 0], [2, 12, 31, 3, 0, 0]])
    np.testing.assert_array_equal(labels, [[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]])


def test_loss_terms_match_numpy():
    rng = np.random.default_rng(0)
    b, m, v, seq = 3, 4, 23, 6
    gen = rng.normal(size=(b, m, v)).astype(np.float32) * 2
    targets = rng.integers(0, v, (b, m))
    weights = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    disc = rng.normal(size=(b, seq)).astype(np.float32) * 3
    labels = rng.integers(0, 2, (b, seq)).astype(np.float32)
    real = np.array([[1] * 6, [1] * 4 + [0] * 2, [0] * 6], np.float32)
    rows = np.array([1, 1, 0], np.float32)  # the last row is padding
    loss, aux = jax.jit(electra_loss_terms, static_argnums=7)(
        gen, targets, weights, disc, labels, real, rows, 50.0
    )
    nll = -np.take_along_axis(log_softmax(gen), targets[..., None], -1)[..., 0]
    mlm = ((nll * weights).sum(1) / np.maximum(weights.sum(1), 1)).sum()
    p = 1 / (1 + np.exp(-disc.astype(np.float64)))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    per_row = (bce * real).sum(1) / np.maximum(real.sum(1), 1)
    assert float(loss) == pytest.approx(mlm + 50 * (per_row * rows).sum(), rel=1e-5)
    want = {
        "mlm_loss": mlm, "disc_loss": (per_row * rows).sum(), "disc_ce": (bce * real).sum(),
        "disc_correct": (((disc > 0) == (labels > 0)) * real).sum(), "disc_tokens": real.sum(),
        "disc_replaced": (labels * real).sum(), "mlm_tokens": weights.sum(), "weight": 2.0,
    }  # fmt: skip
    for k, value in want.items():
        assert float(aux[k]) == pytest.approx(value, rel=1e-5, abs=1e-6), k
