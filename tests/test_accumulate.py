"""The accumulation math: unreduced losses and their terms, the single division, the sums."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from distaccum.accumulate import GradientAccumulator, MicroBatchSums
from distaccum.comm import pieces
from distaccum.objective import OutputLoss, data_term, resolve_losses, unreduced_loss

Y_TRUE = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], "float32")
Y_PRED = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], "float32")


@pytest.mark.rounding
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean", None])
@pytest.mark.parametrize(
    "loss_class",
    [keras.losses.MeanSquaredError, keras.losses.CategoricalCrossentropy, keras.losses.Huber],
)
def test_unreduced_loss_ignores_reduction_when_loss_object_reduces(loss_class, reduction):
    expected = loss_class(reduction=None)(Y_TRUE, Y_PRED).numpy()
    got, mask = unreduced_loss(loss_class(reduction=reduction), Y_TRUE, Y_PRED)
    assert got.shape == (3,) and mask is None
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


@pytest.mark.rounding
def test_unreduced_loss_casts_integer_labels_when_sparse_crossentropy():
    labels = np.array([1, 0, 0], "int64")
    loss = keras.losses.SparseCategoricalCrossentropy()
    expected = -np.log(Y_PRED[np.arange(3), labels])
    np.testing.assert_allclose(unreduced_loss(loss, labels, Y_PRED)[0].numpy(), expected, rtol=1e-5)


# A `[2, 3]` loss: mean squared errors 1, 0, 1 and 4, 9, 16 (their sum 31).
Y_SEQUENCE, PREDICTED_SEQUENCE = (np.ones((2, 3, 1), "float32"),
                                  np.arange(6, dtype="float32").reshape(2, 3, 1))
PER_SAMPLE = np.array([1.0, 2.0], "float32")  # Σ w·l = 2 + 2 * 29 = 60
PER_ELEMENT = np.array([[1, 1, 0], [1, 0, 0]], "float32")  # Σ w·l = 1 + 0 + 4 = 5


def _term(reduction, weights, loss_weight=1.0):
    loss = keras.losses.MeanSquaredError(reduction=reduction)
    return data_term(OutputLoss("out", loss, loss_weight), Y_SEQUENCE, PREDICTED_SEQUENCE,
                     weights, shared_weights=True, ragged=set())


@pytest.mark.rounding
@pytest.mark.parametrize("reduction, weights, normaliser, ratio", [
    # Keras's default divides by the 6 loss elements, weighted or not: the sample count (2)
    # divides a numerator already divided by each sample's 3 elements.
    ("sum_over_batch_size", None, "samples", (31 / 3, 2)),
    ("sum_over_batch_size", PER_SAMPLE, "samples", (60 / 3, 2)),
    ("mean", PER_ELEMENT, "samples", (5 / 3, 2)),
    # Σ w as given: a `[batch]` weight on a `[batch, time]` loss sums over the batch only.
    ("mean_with_sample_weight", PER_SAMPLE, "sample_weight", (60, 3)),
    ("mean_with_sample_weight", PER_ELEMENT, "sample_weight", (5, 3)),
    ("mean_with_sample_weight", None, "samples", (31 / 3, 2)),
    # `sum` divides by nothing: no divisor accumulates.
    ("sum", PER_SAMPLE, "sum", (60, 0)),
], ids=["default", "default_weighted", "mean_per_element", "weighted_mean_per_sample",
        "weighted_mean_per_element", "weighted_mean_unweighted", "sum"])
def test_data_term_is_the_reductions_numerator_and_divisor(reduction, weights, normaliser, ratio):
    term = _term(reduction, weights, loss_weight=0.5)
    assert term.normaliser == normaliser
    assert float(term.numerator) == pytest.approx(0.5 * ratio[0])
    assert float(term.divisor) == ratio[1]
    keras_value = keras.losses.MeanSquaredError(reduction=reduction)(
        Y_SEQUENCE, PREDICTED_SEQUENCE, None if weights is None else
        (weights[:, None] if weights.ndim == 1 else weights))
    assert float(term.numerator) / (float(term.divisor) or 1) == pytest.approx(
        0.5 * float(keras_value))


@pytest.mark.rounding
def test_data_term_counts_the_windows_elements_when_the_loss_has_no_fixed_size_per_sample():
    ragged = set()
    loss = OutputLoss("out", keras.losses.MeanSquaredError())
    spec = tf.TensorSpec([None, None, 1], tf.float32)
    traced = tf.function(lambda y, p: data_term(loss, y, p, None, True, ragged).normaliser)
    traced.get_concrete_function(spec, spec)
    assert ragged == {"out"}
    # Later calls keep the element count, even with sizes known (XLA's stand-in).
    term = data_term(loss, Y_SEQUENCE, PREDICTED_SEQUENCE, None, True, ragged)
    assert (term.normaliser, float(term.numerator), float(term.divisor)) == ("elements:out", 31, 6)


def test_reduction_none_is_refused_in_one_line_naming_it():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"reduction=None, which leaves nothing to minimise.*"
                                         r"Received: reduction=None$") as raised:
        resolve_losses(model, keras.losses.MeanSquaredError(reduction=None))
    assert "\n" not in str(raised.value)


def _means(gradient_sums, divisors):
    """`mean_in_place` on these sums (per normaliser, per variable), as arrays."""
    count = len(gradient_sums)
    accumulator = GradientAccumulator([keras.Variable(np.zeros(g.shape, "float32"))
                                       for g in gradient_sums[0]],
                                      [f"normaliser{i}" for i in range(count)])
    accumulator.add(MicroBatchSums(gradient_sums, [0.0] * count, [1.0] * count, 1), first=True)
    return [m.numpy() for m in accumulator.mean_in_place(divisors)]


def _stored(accumulator) -> tuple[list[np.ndarray], list[float]]:
    """The stored gradient sums (every normaliser's, flat) and statistics."""
    return ([v.numpy() for v in accumulator.gradient_sum_variables],
            [float(t) for t in accumulator.statistics()])


def test_mean_gives_zero_not_nan_when_weights_sum_to_zero():
    [result] = _means([[tf.constant([0.0, 0.0])]], [tf.constant(0.0)])
    np.testing.assert_array_equal(result, [0.0, 0.0])


@pytest.mark.rounding
def test_mean_divides_each_normaliser_by_its_own_sum():
    [result] = _means([[tf.constant([2.0])], [tf.constant([9.0])]],
                      [tf.constant(4.0), tf.constant(3.0)])
    np.testing.assert_allclose(result, [0.5 + 3.0])


def test_accumulator_sums_a_window_and_its_last_micro_batch_in_place():
    dense = keras.Variable(np.zeros((2,), "float32"))
    table = keras.Variable(np.zeros((4, 2), "float32"))
    accumulator = GradientAccumulator([dense, table])
    sparse = tf.IndexedSlices(tf.constant([[1.0, 1.0], [2.0, 2.0]]), tf.constant([1, 1]), [4, 2])
    accumulator.add(MicroBatchSums([[tf.constant([1.0, 2.0]), sparse]], [3.0], [2.0], 5),
                    first=True)
    accumulator.add(MicroBatchSums([[tf.constant([1.0, 0.0]), None]], [1.0], [0.5], 1),
                    first=False)
    last = MicroBatchSums([[tf.constant([0.5, 0.5]), sparse]], [1.0], [1.0], 2)
    statistics = accumulator.store_window(last, stored=True)
    assert [float(s) for s in statistics] == [5.0, 3.5, 8.0]
    # The last micro-batch was added to the stored sums in place: the reduction, the division
    # and the optimizer read them there (no second copy of the gradients).
    gradient_sums, statistics = _stored(accumulator)
    np.testing.assert_array_equal(gradient_sums[0], [2.5, 2.5])
    np.testing.assert_array_equal(gradient_sums[1], [[0, 0], [6, 6], [0, 0], [0, 0]])
    assert statistics == [5.0, 3.5, 8.0]
    # The next window's first micro-batch overwrites them.
    accumulator.add(MicroBatchSums([[tf.constant([4.0, 4.0]), None]], [1.0], [1.0], 1),
                    first=True)
    gradient_sums, statistics = _stored(accumulator)
    np.testing.assert_array_equal(gradient_sums[0], [4.0, 4.0])
    assert not gradient_sums[1].any()
    assert statistics == [1.0, 1.0, 1.0]
    # A window of one micro-batch (k = 1, or an epoch's last) is written over them; a window
    # with nothing at all (its worker ran out) is zeros.
    accumulator.store_window(last, stored=False)
    gradient_sums, statistics = _stored(accumulator)
    np.testing.assert_array_equal(gradient_sums[1], [[0, 0], [3, 3], [0, 0], [0, 0]])
    assert statistics == [1.0, 1.0, 2.0]
    accumulator.store_window(None, stored=False)
    gradient_sums, statistics = _stored(accumulator)
    assert not any(g.any() for g in gradient_sums) and statistics == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("group_bytes", [pieces.GROUP_BYTES, 8], ids=["whole", "in pieces"])
def test_mean_in_place_is_written_over_the_first_normalisers_sums(monkeypatch, group_bytes):
    monkeypatch.setattr(pieces, "GROUP_BYTES", group_bytes)  # 8: pieces of 2 rows or fewer
    variables = [keras.Variable(np.zeros((2,), "float32")),
                 keras.Variable(np.zeros((5, 1), "float32"))]
    accumulator = GradientAccumulator(variables, ["samples", "sum"])
    sums = [[tf.constant([2.0, 4.0]), tf.constant([[1.0], [0.0], [3.0], [2.0], [8.0]])],
            [tf.constant([9.0, 0.0]), tf.constant([[0.0], [5.0], [1.0], [1.0], [1.0]])]]
    divisors = [tf.constant(2.0), tf.constant(1.0)]
    accumulator.add(MicroBatchSums(sums, [0.0, 0.0], [1.0, 1.0], 1), first=True)
    expected = [[1.0 + 9.0, 2.0 + 0.0], [[0.5 + 0.0], [0.0 + 5.0], [1.5 + 1.0], [1 + 1], [4 + 1]]]
    means = accumulator.mean_in_place(divisors)
    stored, _ = _stored(accumulator)
    for got, first, want in zip(means, stored[:2], expected):
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(first, want)


def test_accumulator_refuses_no_variables():
    with pytest.raises(ValueError, match="no trainable variables"):
        GradientAccumulator([])
