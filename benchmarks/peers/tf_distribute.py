"""tf.distribute's answer to the exactness case and the throughput workload, written the way a
user of `MultiWorkerMirroredStrategy` (Keras 3, TensorFlow 2.21) would write it.

Why it exists: MultiWorkerMirroredStrategy is what TensorFlow offers for synchronous data-parallel
training, so it is the first thing distaccum is compared with. It has no exact gradient
accumulation: Keras 3's `fit` fails under it (keras#20585, tensorflow#72388), and so, by
keras#20582, does Keras's own `gradient_accumulation_steps`. What is left is the custom loop of
TensorFlow's tutorials (`strategy.run` in a `tf.function`, the loss scaled by
`tf.nn.compute_average_loss`), either on micro-batches b with an allreduce every step (not the same
math) or on k·b samples per step (the same math as large-batch training, with k times the
activation memory). This script measures:

- `exactness --variant V`: what each of those does on `case.py` (two uneven, sample-weighted shards,
  momentum, two epochs): an error line, or final weights and `iterations` for the comparison with
  the float64 reference;
- `throughput --per-replica {b,kb}`: samples/s of the custom loop on the ≈2.1 M-parameter MLP of
  the other benchmarks, one thread per worker, at each k (`--per-replica b kb`: both, one after
  the other in the same workers, as the smoke run does to start TensorFlow once).

Every subcommand but `launch` runs inside one of the workers `launch` starts: two processes on the
loopback, each with its `TF_CONFIG`, ring collectives. The parent and `command()` (which the
harness imports) never import TensorFlow.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

SCRIPT = Path(__file__).resolve()
PYTHON = SCRIPT.parents[2] / ".venv" / "bin" / "python"  # not resolved: the venv's own python
WORKERS = 2
RESULT = "result.json"
# After one worker fails, how long the others get to finish on their own (rank 0 writing its
# error result) before they are killed: a worker left in a collective would wait for its peer.
GRACE_SECONDS = 15.0
HUNG_EXIT_STATUS = 124  # as `timeout(1)`: the workers did not fail, they stopped progressing
WARMUP_STEPS = 2  # the first call traces the step function; the second runs the traced one

tf = keras = np = case = None  # imported by `load_worker_modules`, in the workers only


def command(arguments: list[str], out: str, timeout: float = 600) -> list[str]:
    """The command line that runs `arguments` (a subcommand of this script and its options) in
    `WORKERS` workers, their logs in `out`, stopped as hung after `timeout` seconds."""
    return [str(PYTHON), str(SCRIPT), "launch", "--workers", str(WORKERS), "--out", str(out),
            "--timeout", str(timeout), "--", *map(str, arguments)]


# ---------------------------------------------------------------------------------- the parent

def launch(args) -> None:
    """Start the workers, wait for all of them; end with the first failure's error line, or
    with "hung" (exit status 124) when they outlast `--timeout`."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    addresses = [f"127.0.0.1:{port}" for port in free_ports(args.workers)]
    workers = [start_worker(index, addresses, arguments, out) for index in range(args.workers)]
    try:
        failed = first_failure(workers, args.timeout)
        running = [index for index, worker in enumerate(workers) if worker.poll() is None]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    if failed is not None:
        log = worker_log(out, failed)
        sys.exit(f"{SCRIPT.name} launch: error: worker {failed} exited "
                 f"{workers[failed].returncode}: {last_error_line(log.read_text())} (log: {log})")
    if running:
        print(f"{SCRIPT.name} launch: error: workers hung: {running} still running after "
              f"{args.timeout:.0f} s, killed (logs in {out})", file=sys.stderr)
        sys.exit(HUNG_EXIT_STATUS)


def free_ports(count: int) -> list[int]:
    """`count` loopback ports nothing listens on now (held open together, so all differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def start_worker(index: int, addresses: list[str], arguments: list[str], out: Path):
    cluster = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    env = {**os.environ, "TF_CONFIG": json.dumps(cluster), "PYTHONUNBUFFERED": "1"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(worker_log(out, index), "w") as log:
        return subprocess.Popen([str(PYTHON), str(SCRIPT), *arguments], stdout=log,
                                stderr=subprocess.STDOUT, env=env)


def worker_log(out: Path, index: int) -> Path:
    return out / f"worker{index}.log"


def first_failure(workers, timeout: float) -> int | None:
    """Wait until every worker has ended, one has failed or `timeout` has passed; return the
    index of the first that failed, if any. After a failure the others get `GRACE_SECONDS`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [worker.poll() for worker in workers]
        failures = [index for index, code in enumerate(codes) if code not in (None, 0)]
        if failures:
            wait_until_all_ended(workers, time.monotonic() + GRACE_SECONDS)
            return failures[0]
        if None not in codes:
            return None
        time.sleep(0.2)
    return None


def wait_until_all_ended(workers, deadline: float) -> None:
    while time.monotonic() < deadline and any(worker.poll() is None for worker in workers):
        time.sleep(0.2)


def last_error_line(output: str) -> str:
    """The line that says what went wrong: the last one naming an error, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1]


# ---------------------------------------------------------------------------- in every worker

def load_worker_modules() -> None:
    """TensorFlow, Keras, NumPy and the case, for the workers only (see the module docstring)."""
    global tf, keras, np, case
    import case
    import keras
    import numpy as np
    import tensorflow as tf


def rank() -> int:
    """This worker's index in `TF_CONFIG`, known before TensorFlow starts (for error results)."""
    return json.loads(os.environ["TF_CONFIG"])["task"]["index"]


def start_strategy():
    """MultiWorkerMirroredStrategy with ring collectives, one intra-op and one inter-op thread.

    The threads are set before TensorFlow runs any op: two workers on a 2-core machine then use
    a core each, as in the project's other benchmarks.
    """
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    ring = tf.distribute.experimental.CommunicationImplementation.RING
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=ring))


def per_example_loss():
    """Sparse cross-entropy on logits, unreduced: the custom loop scales it itself."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def distributed_train_step(strategy, model, optimizer, per_replica_batch: int):
    """The tutorials' step: each replica's loss is Σ w·l / global batch size
    (`tf.nn.compute_average_loss`), `apply_gradients` all-reduces (sums) the gradients. Returns
    the loss summed over replicas, so reading it waits for the step."""
    loss = per_example_loss()
    global_batch_size = per_replica_batch * strategy.num_replicas_in_sync

    def replica_step(x, y, sample_weight=None):
        with tf.GradientTape() as tape:
            scaled = tf.nn.compute_average_loss(loss(y, model(x, training=True)),
                                                sample_weight=sample_weight,
                                                global_batch_size=global_batch_size)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return scaled

    @tf.function
    def step(batch):
        return strategy.reduce(tf.distribute.ReduceOp.SUM,
                               strategy.run(replica_step, args=batch), axis=None)

    return step


def write_result(out: str, payload) -> None:
    if rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / RESULT).write_text(json.dumps(payload))


def one_line(error: BaseException) -> str:
    """The error as one line: terminal colours dropped, multi-line values (a PerReplica's
    tensors) elided, and TensorFlow's "in user code:" trace reduced to the error raised at its
    bottom (the message under Keras's "Exception encountered when calling …" header)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    text = re.sub(r"\{\n.*?\n\s*\}", "{…}", text, flags=re.DOTALL)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [index for index, line in enumerate(lines)
              if re.match(r"[\w.]+(Error|Exception): ", line)]
    if lines[:1] != ["in user code:"] or not raised:
        return f"{type(error).__name__}: {' '.join(lines)}"
    kind, message = lines[raised[-1]].split(": ", 1)
    if message.startswith("Exception encountered when calling"):
        message = lines[raised[-1] + 1]
    return f"{kind}: {message}"


# ---------------------------------------------------------------------------------- exactness

def exactness(args) -> None:
    """Train the case one way (`--variant`); rank 0 writes the result, an error result too, and a
    failure still exits non-zero so `launch` and the harness never wait on it."""
    notes: list[str] = []
    try:
        load_worker_modules()
        strategy = start_strategy()
        model, optimizer = VARIANTS[args.variant](strategy, notes)
        result = {"status": "ok", "error": "",
                  "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations)),
                  "weights": [weight.tolist() for weight in model.get_weights()]}
        failure = None
    except Exception as error:  # the variant's outcome, reported rather than raised
        traceback.print_exc()
        failure = one_line(error)
        result = {"status": "error", "error": failure, "iterations": None, "weights": None}
    write_result(args.out, {"system": "tf_distribute", "variant": args.variant, **result,
                            "note": "; ".join(notes)})
    if failure is not None:
        sys.exit(f"{SCRIPT.name} exactness: error: {failure}")


def keras_fit(strategy, notes):
    """`compile` under the strategy's scope, `fit` on per-replica batches of k·b."""
    notes.append(f"Keras fit, per-replica batch {large_batch()}, Keras's own loss scaling and "
                 "sample weights, each worker its own shard (auto-shard OFF)")
    return fit_case(strategy, large_batch(), case_optimizer)


def keras_gradient_accumulation(strategy, notes):
    """Keras's `gradient_accumulation_steps=k` on micro-batches b: first in `fit`; if `fit`
    fails for the PerReplica reason (keras#20585), in the tutorials' custom loop."""
    optimizer = functools.partial(case_optimizer,
                                  gradient_accumulation_steps=case.ACCUMULATION_STEPS)
    try:
        notes.append(f"Keras fit, SGD(gradient_accumulation_steps={case.ACCUMULATION_STEPS}), "
                     f"per-replica batch {case.MICRO_BATCH}")
        return fit_case(strategy, case.MICRO_BATCH, optimizer)
    except Exception as error:
        if "PerReplica" not in str(error):
            raise
        notes.append(f"fit failed ({one_line(error)}); custom loop instead")
    return custom_loop(strategy, case.MICRO_BATCH, notes, optimizer)


def custom_loop_b(strategy, notes):
    """An update (and an allreduce) every micro-batch b: updates of 2·b, not the case's 2·k·b."""
    return custom_loop(strategy, case.MICRO_BATCH, notes, case_optimizer)


def custom_loop_kb(strategy, notes):
    """k·b samples per replica and step: the case's large-batch math, k× the activations."""
    return custom_loop(strategy, large_batch(), notes, case_optimizer)


def large_batch() -> int:
    return case.ACCUMULATION_STEPS * case.MICRO_BATCH


def case_optimizer(**options):
    return keras.optimizers.SGD(case.LEARNING_RATE, momentum=case.MOMENTUM, **options)


def case_model():
    """Dense(16, tanh) → Dense(3) logits, starting from the case's weights."""
    model = keras.Sequential([keras.Input((case.FEATURES,)),
                              keras.layers.Dense(case.HIDDEN, activation="tanh"),
                              keras.layers.Dense(case.CLASSES)])
    model.set_weights(case.initial_weights())
    return model


def case_shard(per_replica_batch: int, worker: int):
    """Worker `worker`'s shard (x, y, sample_weight) in order, batched, the last batch ragged."""
    return tf.data.Dataset.from_tensor_slices(case.shard(worker)).batch(per_replica_batch)


def fit_case(strategy, per_replica_batch: int, make_optimizer):
    with strategy.scope():
        model = case_model()
        model.compile(optimizer=make_optimizer(),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = case_shard(per_replica_batch, rank()).with_options(options)
    model.fit(dataset, epochs=case.EPOCHS, shuffle=False, verbose=0)
    return model, model.optimizer


def custom_loop(strategy, per_replica_batch: int, notes, make_optimizer):
    """The tutorials' loop over each worker's shard, `case.EPOCHS` times.

    Uneven shards: stepping each worker through its own number of batches (`next(iterator)`)
    desynchronises the allreduces; the worker with more batches then waits on a peer that has
    finished and, once that peer's process exits, fails ("UnavailableError: Collective ops is
    aborted by: … tasks are unhealthy (stopped sending heartbeats)"); the other ends with wrong
    weights and exit status 0. TensorFlow's documented way (the distributed input
    tutorial, "Partial batches") is `for batch in dist_dataset`: for a finite dataset
    MultiWorkerMirroredStrategy all-reduces a has-data flag every step and gives a worker out of
    data empty batches until every worker is, so all run the same steps.
    """
    dataset = strategy.distribute_datasets_from_function(
        lambda context: case_shard(per_replica_batch, context.input_pipeline_id))
    with strategy.scope():
        model, optimizer = case_model(), make_optimizer()
    step = distributed_train_step(strategy, model, optimizer, per_replica_batch)
    global_batch_size = per_replica_batch * strategy.num_replicas_in_sync
    notes.append(
        f"custom loop; loss: tf.nn.compute_average_loss(l, sample_weight=w, global_batch_size="
        f"{global_batch_size}) = Σw·l/{global_batch_size} on every step, partial ones too "
        "(the case's sum_over_batch_size: Σw·l/n, n the step's samples on both workers); "
        "uneven shards: `for batch in dist_dataset` (MWMS partial batches: empty batches on the "
        "worker out of data, a has-data all-reduce per step; stepping each worker through its "
        "own batch count instead: UnavailableError on the longer one); memory: "
        f"activations of {per_replica_batch} samples per replica")
    for _ in range(case.EPOCHS):
        for batch in dataset:
            step(batch)
    return model, optimizer


VARIANTS = {variant.__name__: variant for variant in (
    keras_fit, keras_gradient_accumulation, custom_loop_b, custom_loop_kb)}


# --------------------------------------------------------------------------------- throughput

def throughput(args) -> None:
    """Samples/s of the custom loop at each k (for each `--per-replica`, in turn); rank 0 writes
    one row per repeat, per-replica batch and k."""
    load_worker_modules()
    strategy = start_strategy()
    with strategy.scope():
        model = benchmark_model()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    rows = []
    for per_replica in args.per_replica:
        rows += throughput_rows(args, strategy, model, optimizer, per_replica)
    write_result(args.out, rows)


def throughput_rows(args, strategy, model, optimizer, per_replica: str) -> list[dict]:
    """One per-replica batch's rows: per k, `--repeats` timed runs of the same samples."""
    system = f"tf_distribute_{per_replica}"
    rows = []
    for k in args.accumulation_steps:
        updates = max(math.ceil(args.micro_batches / k), args.min_updates)
        per_replica_batch, steps = ((args.micro_batch, k * updates) if per_replica == "b"
                                    else (k * args.micro_batch, updates))
        step = distributed_train_step(strategy, model, optimizer, per_replica_batch)
        batches = iter(strategy.distribute_datasets_from_function(
            functools.partial(random_batches, per_replica_batch)))
        run_steps(step, batches, WARMUP_STEPS)
        for repeat in range(args.repeats):
            barrier(strategy)
            started = time.perf_counter()
            run_steps(step, batches, steps)
            seconds = slowest_worker(strategy, time.perf_counter() - started)
            rows.append({"repeat": repeat, "k": k, "system": system, "updates": steps,
                         "samples": strategy.num_replicas_in_sync * per_replica_batch * steps,
                         "seconds": seconds})
    return rows


def benchmark_model():
    """512 → 1024 → 1024 → 512 (relu) → 10 logits, ≈2.1 M parameters (the bundled
    `synthetic_mlp`): 8.4 MB of gradients, enough for the allreduce to matter."""
    keras.utils.set_random_seed(0)
    hidden = [keras.layers.Dense(units, activation="relu") for units in (1024, 1024, 512)]
    return keras.Sequential([keras.Input((512,)), *hidden, keras.layers.Dense(10)])


def random_batches(per_replica_batch: int, context):
    """This worker's own 8192 random samples (seeded by its pipeline id), repeating, with
    tf.data's autotuning off: nothing to tune, and it would only add noise to the timings."""
    rng = np.random.default_rng(context.input_pipeline_id)
    x = rng.normal(size=(8192, 512)).astype("float32")
    y = rng.integers(0, 10, size=8192).astype("int32")
    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    return dataset.batch(per_replica_batch, drop_remainder=True).repeat().prefetch(2).with_options(
        options)


def run_steps(step, batches, count: int) -> None:
    """`count` steps; reading the last loss back makes the time include finishing them."""
    for _ in range(count):
        loss = step(next(batches))
    float(loss)


def barrier(strategy) -> None:
    """A one-number collective every worker must join before the clock starts."""
    slowest_worker(strategy, 0.0)


def slowest_worker(strategy, seconds: float) -> float:
    """The largest of every worker's `seconds` (gathered across workers)."""
    mine = strategy.experimental_distribute_values_from_function(
        lambda _: tf.constant([seconds], tf.float64))
    return float(tf.reduce_max(strategy.gather(mine, axis=0)))


# ------------------------------------------------------------------------------ command line

def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return int(text)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="subcommand", required=True)
    launcher = commands.add_parser("launch", help="run a subcommand in N workers")
    launcher.add_argument("--workers", type=positive_int, default=WORKERS)
    launcher.add_argument("--out", required=True, help="directory for the workers' logs")
    launcher.add_argument("--timeout", type=float, default=600.0,
                          help="seconds after which the workers count as hung")
    launcher.add_argument("arguments", nargs=argparse.REMAINDER,
                          help="-- then the subcommand and its options")
    case_run = commands.add_parser("exactness", help="train the exactness case one way")
    case_run.add_argument("--variant", choices=VARIANTS, required=True)
    case_run.add_argument("--out", required=True)
    bench = commands.add_parser("throughput", help="samples/s of the custom loop")
    bench.add_argument("--per-replica", choices=("b", "kb"), nargs="+", required=True)
    bench.add_argument("--accumulation-steps", type=positive_int, nargs="+", required=True)
    bench.add_argument("--micro-batch", type=positive_int, required=True)
    bench.add_argument("--micro-batches", type=positive_int, required=True)
    bench.add_argument("--min-updates", type=positive_int, required=True)
    bench.add_argument("--repeats", type=positive_int, required=True)
    bench.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main() -> None:
    # SIGTERM (the harness giving up) becomes SystemExit, so `launch` still stops its workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args = parse_arguments()
    {"launch": launch, "exactness": exactness, "throughput": throughput}[args.subcommand](args)


if __name__ == "__main__":
    main()
