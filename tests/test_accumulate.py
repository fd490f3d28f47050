"""The accumulation math: unreduced losses and their terms, the single division, the sums."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from distaccum.accumulate import GradientAccumulator, MicroBatchSums, mean_gradients
from distaccum.objective import OutputLoss, data_term, unreduced_loss

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
    got = unreduced_loss(loss_class(reduction=reduction), Y_TRUE, Y_PRED).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.rounding
def test_unreduced_loss_casts_integer_labels_when_sparse_crossentropy():
    labels = np.array([1, 0, 0], "int64")
    loss = keras.losses.SparseCategoricalCrossentropy()
    expected = -np.log(Y_PRED[np.arange(3), labels])
    np.testing.assert_allclose(unreduced_loss(loss, labels, Y_PRED).numpy(), expected, rtol=1e-5)


@pytest.mark.rounding
def test_data_term_averages_extra_axes_when_weights_are_per_sample():
    y_true = np.ones((2, 3, 1), "float32")
    y_pred = np.arange(6, dtype="float32").reshape(2, 3, 1)
    weights = np.array([1.0, 2.0], "float32")
    term = data_term(OutputLoss("out", keras.losses.mean_squared_error, 0.5), y_true, y_pred,
                     weights, per_output_weights=False)
    assert term.normaliser == "sample_weight"
    assert float(term.numerator) == pytest.approx(0.5 * (np.mean([1, 0, 1]) + 2 * np.mean([4, 9, 16])))
    assert float(term.divisor) == 3.0


def test_data_term_weighs_each_element_when_weights_are_per_element():
    y_true = np.ones((2, 3, 1), "float32")
    y_pred = np.arange(6, dtype="float32").reshape(2, 3, 1)
    mask = np.array([[1, 1, 0], [1, 0, 0]], "float32")
    term = data_term(OutputLoss("out", keras.losses.mean_squared_error), y_true, y_pred, mask,
                     per_output_weights=False)
    assert term.normaliser == "element_weight:out"
    assert float(term.numerator) == 1 + 0 + 4 and float(term.divisor) == 3.0


def test_mean_gradients_gives_zero_not_nan_when_weights_sum_to_zero():
    result = mean_gradients([[tf.constant([0.0, 0.0])]], [tf.constant(0.0)])
    np.testing.assert_array_equal(result[0].numpy(), [0.0, 0.0])


@pytest.mark.rounding
def test_mean_gradients_divides_each_normaliser_by_its_own_sum():
    result = mean_gradients([[tf.constant([2.0])], [tf.constant([9.0])]],
                            [tf.constant(4.0), tf.constant(3.0)])
    np.testing.assert_allclose(result[0].numpy(), [0.5 + 3.0])


def test_accumulator_sums_a_window_and_its_unstored_last_micro_batch():
    dense = keras.Variable(np.zeros((2,), "float32"))
    table = keras.Variable(np.zeros((4, 2), "float32"))
    accumulator = GradientAccumulator([dense, table])
    sparse = tf.IndexedSlices(tf.constant([[1.0, 1.0], [2.0, 2.0]]), tf.constant([1, 1]), [4, 2])
    accumulator.add(MicroBatchSums([[tf.constant([1.0, 2.0]), sparse]], [3.0], [2.0], 5),
                    first=True)
    accumulator.add(MicroBatchSums([[tf.constant([1.0, 0.0]), None]], [1.0], [0.5], 1),
                    first=False)
    last = MicroBatchSums([[tf.constant([0.5, 0.5]), sparse]], [1.0], [1.0], 2)
    [gradient_sums], numerators, divisors, count = accumulator.split(accumulator.totals(last))
    np.testing.assert_array_equal(gradient_sums[0].numpy(), [2.5, 2.5])
    np.testing.assert_array_equal(gradient_sums[1].numpy(), [[0, 0], [6, 6], [0, 0], [0, 0]])
    assert [float(s) for s in (*numerators, *divisors, count)] == [5.0, 3.5, 8.0]
    # The last micro-batch was not stored; the next window's first overwrites the stored sums.
    [gradient_sums], *_ = accumulator.split(accumulator.totals())
    np.testing.assert_array_equal(gradient_sums[1].numpy(), [[0, 0], [3, 3], [0, 0], [0, 0]])
    accumulator.add(MicroBatchSums([[tf.constant([4.0, 4.0]), None]], [1.0], [1.0], 1),
                    first=True)
    [gradient_sums], numerators, divisors, count = accumulator.split(accumulator.totals())
    np.testing.assert_array_equal(gradient_sums[0].numpy(), [4.0, 4.0])
    assert float(tf.reduce_sum(tf.abs(gradient_sums[1]))) == 0
    assert [float(s) for s in (*numerators, *divisors, count)] == [1.0, 1.0, 1.0]
    # A window with nothing stored (its worker ran out, or k = 1) never reads the stored sums.
    assert all(float(tf.reduce_sum(tf.abs(t))) == 0
               for t in accumulator.totals(stored=False))
    [gradient_sums], *_ = accumulator.split(accumulator.totals(last, stored=False))
    np.testing.assert_array_equal(gradient_sums[1].numpy(), [[0, 0], [3, 3], [0, 0], [0, 0]])


def test_accumulator_refuses_no_variables():
    with pytest.raises(ValueError, match="no trainable variables"):
        GradientAccumulator([])
