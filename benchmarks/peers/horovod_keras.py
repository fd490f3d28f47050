"""Horovod's own gradient accumulation, written the way a Horovod user would: the peer distaccum
is measured against.

Horovod already offers one allreduce per k micro-batches in Keras:
`hvd.DistributedOptimizer(opt, backward_passes_per_step=k)` with `model.fit`. This script runs
that on the two questions distaccum answers, so the comparison is with the real thing rather than
a description of it:

- `exactness`: the case of `case.py` (uneven shards, sample weights, momentum, 2 epochs); rank 0
  writes the final weights and `optimizer.iterations` for comparison with the float64 reference.
- `throughput`: the benchmark MLP (≈2.1 M parameters) on two workers; rank 0 writes the slower
  rank's seconds per timed `fit` for each k.

Horovod's Keras API does not work with Keras 3, so this runs on Keras 2 (tf-keras, selected by
TF_USE_LEGACY_KERAS=1 before TensorFlow is imported), the route Horovod users on TF >= 2.16 take.

Uneven shards: if each rank simply fits its own shard, rank 1 (83 samples, 5 allreduces) leaves
`fit` and exits while rank 0 (120 samples, 7 allreduces) waits, and rank 0 stops with "Horovod has
been shut down ... an attempt to allreduce ... after one of the ranks finished execution".
(`horovod.tensorflow.join()` after `fit` avoids the error but leaves the ranks with different
weights.) So `exactness` does what Horovod's TF 2 Keras example does: every rank repeats its data
and fits the same `steps_per_epoch`, here the smaller shard's full micro-batches.

TensorFlow is imported inside the functions that use it, so the harness imports `command`
without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras is then tf-keras, which Horovod wraps

SCRIPT = Path(__file__).resolve()
VENV_BIN = SCRIPT.parents[2] / ".venv" / "bin"
SYSTEM = "horovod_bpps"
WORKERS = 2
RESULT = "result.json"
SYNTHETIC_SAMPLES, SYNTHETIC_FEATURES, SYNTHETIC_CLASSES = 8192, 512, 10
UNEVEN_SHARDS_NOTE = ("uneven shards: Horovod's Keras recipe, each rank repeats its shard and fits "
                      "the smaller shard's full micro-batches per epoch; iterations counts "
                      "micro-batches (fit steps), not updates")


def command(arguments: list[str]) -> list[str]:
    """The command line that runs this script with `arguments` on 2 local workers."""
    # The test suite's smoke runs name another horovodrun here (see `common.HOROVODRUN_VARIABLE`).
    horovodrun = (shlex.split(os.environ.get("DISTACCUM_BENCH_HOROVODRUN", ""))
                  or [str(VENV_BIN / "horovodrun")])
    return ["env", "TF_USE_LEGACY_KERAS=1", *horovodrun, "--gloo",
            "-np", str(WORKERS), "-H", f"localhost:{WORKERS}",
            str(VENV_BIN / "python"), str(SCRIPT), *arguments]


def start_horovod():
    """One intra-op and one inter-op thread (two workers share a 2-core machine), set before
    TensorFlow runs any op, then `hvd.init()`; returns Horovod's Keras module."""
    import tensorflow as tf
    import horovod.tensorflow.keras as hvd

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    return hvd


def distributed_sgd(hvd, learning_rate: float, momentum: float, accumulation_steps: int,
                    average: bool):
    import tensorflow as tf

    return hvd.DistributedOptimizer(tf.keras.optimizers.SGD(learning_rate, momentum=momentum),
                                    backward_passes_per_step=accumulation_steps,
                                    average_aggregated_gradients=average)


def compile_classifier(model, optimizer) -> None:
    import tensorflow as tf

    model.compile(optimizer=optimizer,
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def write_chief(hvd, out: Path, payload) -> None:
    if hvd.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT).write_text(json.dumps(payload))


def one_line(error: Exception) -> str:
    """The error's type and the last line of its message that names a cause: TensorFlow puts the
    cause after the traceback of the op that failed, and the op's node name after that."""
    lines = [line.strip() for line in str(error).splitlines()]
    causes = [line for line in lines if line and not line.startswith("[[")]
    return f"{type(error).__name__}: {causes[-1] if causes else ''}"


def exactness(args) -> None:
    """Train the case; rank 0 writes the final weights, or the error that stopped training."""
    import case  # beside this script; NumPy only

    hvd = start_horovod()
    result = {"system": SYSTEM, "variant": args.variant, "status": "ok", "error": "",
              "iterations": 0, "weights": [], "note": UNEVEN_SHARDS_NOTE}
    try:
        model, steps_per_epoch = train_case(case, hvd, average=args.variant == "average")
        iterations = int(model.optimizer.iterations)
        result.update(
            iterations=iterations, weights=[weights.tolist() for weights in model.get_weights()],
            note=(f"{UNEVEN_SHARDS_NOTE}: steps_per_epoch={steps_per_epoch}, so {iterations} "
                  f"micro-batches = {iterations // case.ACCUMULATION_STEPS} updates"))
    except Exception as error:
        result.update(status="error", error=one_line(error))
        raise
    finally:
        write_chief(hvd, args.out, result)


def train_case(case, hvd, average: bool):
    """The case's model after `fit` with Horovod's accumulation, and the steps_per_epoch used.

    Every rank fits the same number of micro-batches (the smaller shard's full ones, agreed by an
    allgather) from its shard repeated, so both make the same number of allreduces.
    """
    import tensorflow as tf

    x, y, sample_weight = case.shard(hvd.rank())
    steps_per_epoch = int(hvd.allgather([len(x)]).numpy().min()) // case.MICRO_BATCH
    samples = tf.data.Dataset.from_tensor_slices((x, y, sample_weight))
    model = tf.keras.Sequential([
        tf.keras.Input((case.FEATURES,)),
        tf.keras.layers.Dense(case.HIDDEN, activation="tanh"),
        tf.keras.layers.Dense(case.CLASSES),
    ])
    model.set_weights(case.initial_weights())
    compile_classifier(model, distributed_sgd(hvd, case.LEARNING_RATE, case.MOMENTUM,
                                              case.ACCUMULATION_STEPS, average))
    model.fit(samples.repeat().batch(case.MICRO_BATCH), steps_per_epoch=steps_per_epoch,
              epochs=case.EPOCHS, verbose=0,
              callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    return model, steps_per_epoch


def throughput(args) -> None:
    """For each k: a warm-up `fit`, then `repeats` timed `fit`s of k × updates micro-batches."""
    hvd = start_horovod()
    micro_batches = synthetic_micro_batches(hvd, args.micro_batch)
    runs = []
    for k in args.accumulation_steps:
        updates = max(math.ceil(args.micro_batches / k), args.min_updates)
        model = synthetic_model(hvd, k)
        # Tracing and the initial broadcast happen here, outside the timings.
        model.fit(micro_batches, steps_per_epoch=k, epochs=1, verbose=0,
                  callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
        for repeat in range(args.repeats):
            seconds = slowest_fit_seconds(hvd, model, micro_batches, steps=k * updates)
            runs.append({"repeat": repeat, "k": k, "system": SYSTEM, "updates": updates,
                         "samples": hvd.size() * args.micro_batch * k * updates,
                         "seconds": seconds})
    write_chief(hvd, args.out, runs)


def synthetic_micro_batches(hvd, micro_batch: int):
    """This rank's shard of seeded random data as full micro-batches, repeating forever.

    tf.data's autotuning is off: these pipelines have nothing to tune, and with it on, ending a
    `fit` can wait out the tuner's period, which would be counted in the timings.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(SYNTHETIC_SAMPLES, SYNTHETIC_FEATURES)).astype("float32")
    y = rng.integers(0, SYNTHETIC_CLASSES, size=SYNTHETIC_SAMPLES).astype("int32")
    micro_batches = (tf.data.Dataset.from_tensor_slices((x, y)).shard(hvd.size(), hvd.rank())
                     .batch(micro_batch, drop_remainder=True).repeat().prefetch(2))
    options = tf.data.Options()
    options.autotune.enabled = False
    return micro_batches.with_options(options)


def synthetic_model(hvd, accumulation_steps: int):
    """The benchmark MLP, 512 → 1024 → 1024 → 512 → 10 logits (8.4 MB of float32 gradients),
    compiled with Horovod's accumulation over `accumulation_steps` micro-batches."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.Input((SYNTHETIC_FEATURES,)),
        tf.keras.layers.Dense(1024, activation="relu"),
        tf.keras.layers.Dense(1024, activation="relu"),
        tf.keras.layers.Dense(512, activation="relu"),
        tf.keras.layers.Dense(SYNTHETIC_CLASSES),
    ])
    compile_classifier(model, distributed_sgd(hvd, 0.01, 0.9, accumulation_steps, average=True))
    return model


def slowest_fit_seconds(hvd, model, micro_batches, steps: int) -> float:
    """Seconds of one `fit` of `steps` micro-batches on the slower rank, both starting together."""
    hvd.allreduce(0.0, name="barrier")
    start = time.perf_counter()
    model.fit(micro_batches, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    return float(hvd.allgather([seconds]).numpy().max())


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return int(text)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="subcommand", required=True)
    exact = subcommands.add_parser("exactness", help="train case.py's case, write final weights")
    exact.add_argument("--variant", choices=("average", "sum"), required=True,
                       help="average_aggregated_gradients=True (average) or False (sum)")
    exact.add_argument("--out", type=Path, required=True)
    exact.set_defaults(run=exactness)
    timed = subcommands.add_parser("throughput", help="time fit on the benchmark MLP per k")
    timed.add_argument("--accumulation-steps", type=positive_int, nargs="+", required=True)
    timed.add_argument("--micro-batch", type=positive_int, required=True)
    timed.add_argument("--micro-batches", type=positive_int, required=True)
    timed.add_argument("--min-updates", type=positive_int, required=True)
    timed.add_argument("--repeats", type=positive_int, required=True)
    timed.add_argument("--out", type=Path, required=True)
    timed.set_defaults(run=throughput)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_arguments()
    arguments.run(arguments)
