"""Every loss reduction × every weighting (tests/reductions.py): distaccum's update is Keras's own
`train_on_batch` on the window's concatenated batch, in one process (under XLA too, in the suite's
second run) and on two workers with uneven shards under each backend (Horovod: every case;
mpi4py under XLA: `reductions.xla_cases()`)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import distaccum
import keras_models
import reductions
import scenarios
from conftest import WORKERS_DIR, run_script

CASES = reductions.cases()


def _assert_keras_step(case_name: str, trained, iterations: int, workers: int) -> None:
    start = scenarios.flat(CASES[case_name].build().trainable_variables)
    reference, steps = reductions.keras_step(case_name, workers)
    assert iterations == steps, case_name
    error = scenarios.distance(trained, reference.trainable_variables, start)
    assert error <= reductions.TOLERANCE, f"{case_name}: {error:.2e} of the weights' movement"


def test_every_kind_of_model_has_its_reductions_and_weightings():
    # The cases are a test each below: their list itself must not shrink unnoticed.
    kinds = collections.Counter(case.model for case in CASES.values())
    assert set(kinds) == {"sequence", "classifier", "two_output"}
    assert all(count >= 4 for count in kinds.values()), kinds


# One case a test, so that the suite's test processes share them out (XLA compiles each anew).
@pytest.mark.rounding
@pytest.mark.parametrize("name", list(CASES))
def test_every_reduction_and_weighting_takes_keras_step_on_the_window_when_accumulated(name):
    # One process; windows of 6, 6 and a ragged 2.
    case = CASES[name]
    model = case.build()
    trainer = distaccum.Trainer(model, reductions.optimizer(), loss=case.loss,
                                loss_weights=case.loss_weights, accumulation_steps=reductions.K)
    trainer.fit(scenarios.as_dataset(*case.data(), reductions.MICRO_BATCH_SIZE),
                epochs=reductions.EPOCHS, **case.train_options())
    _assert_keras_step(name, model.trainable_variables, int(trainer.optimizer.iterations),
                       workers=1)


# launcher, backend, distaccum's steps under XLA
LAUNCHES = {"horovod": ("horovodrun", "horovod", False), "mpi4py_xla": ("mpirun", "mpi", True)}


@pytest.fixture(scope="module", params=list(LAUNCHES))
def two_worker_run(request, tmp_path_factory):
    launcher, backend, xla = LAUNCHES[request.param]
    out = tmp_path_factory.mktemp(f"reductions_{request.param}")
    run_script(launcher, WORKERS_DIR / "train_reductions.py", "--out", str(out),
               *(["--jit-compile"] if xla else []), extra_env={"DISTACCUM_BACKEND": backend})
    return out, backend, xla


@pytest.mark.multiworker
def test_every_reduction_and_weighting_takes_keras_step_when_two_workers_have_uneven_shards(
        two_worker_run):
    out, backend, xla = two_worker_run
    names = reductions.xla_cases() if xla else CASES
    for rank in range(2):
        with np.load(out / f"rank{rank}.npz") as saved:
            assert str(saved["backend"]).lower().startswith(backend), saved["backend"]
            assert sorted(n[:-len("/count")] for n in saved if n.endswith("/count")) == sorted(names)
            for name in names:
                trained = [saved[f"{name}/{i}"] for i in range(saved[f"{name}/count"])]
                _assert_keras_step(name, trained, int(saved[f"{name}/iterations"]),
                                   workers=2)


@pytest.mark.rounding
@pytest.mark.parametrize("name", ["sequence-{}-mask_and_per_element",
                                  "classifier-{}-class_weight_and_per_sample"])
@pytest.mark.parametrize("reduction", reductions.REDUCTIONS)
def test_validation_loss_is_keras_loss_on_the_whole_validation_set(name, reduction):
    # Validation has no windows: its loss is Keras's on all of it as one batch (under `sum`,
    # its sum), whatever the micro-batches.
    case = CASES[name.format(reduction)]
    model = case.build()
    trainer = distaccum.Trainer(model, reductions.optimizer(), loss=case.loss)
    (x, y, w), _ = case.keras_batch(*case.data())  # class weights multiplied into w
    got = trainer.evaluate(scenarios.as_dataset(x, y, w, reductions.MICRO_BATCH_SIZE))["loss"]
    expected = case.loss(y, model(x), sample_weight=w)
    assert got == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name, normalisers", [
    # One output under Keras's default with weights, beside an activity regularizer's added loss.
    ("regularized", ["samples"]),
    ("two_output-weighted_means-per_sample", ["sample_weight"]),  # one Σ w for both outputs
    ("two_output-mixed_reductions-per_sample", ["samples", "sum"]),
])
def test_denominators_that_are_the_same_sum_share_one_gradient_sum(name, normalisers):
    if name == "regularized":
        model, (x, y, w), options = keras_models.setup("regularized")
    else:
        case = CASES[name]
        model, (x, y, w) = case.build(), case.data()
        options = {"loss": case.loss, "loss_weights": case.loss_weights}
    trainer = distaccum.Trainer(model, reductions.optimizer(), accumulation_steps=2, **options)
    assert trainer.gradient_sums == 0  # none before the first step
    trainer.prepare(scenarios.as_dataset(x, y, w).element_spec)
    assert sorted(trainer._steps.accumulator.normalisers) == normalisers
    # What memory budgets count: a model-sized sum per denominator (benchmarks/memory.py).
    assert trainer.gradient_sums == len(normalisers)
