"""What runs inside the measured processes: one subcommand per figure (the overhead figure's
process is `overhead.py worker`, which times this module's Keras and distaccum runners).

The figure scripts start these (one process, or two under `horovodrun --gloo`) and summarise the
JSON they write to `--out`. Every process uses one intra-op thread (see `workload`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import distaccum
from distaccum import comm, order, recordfiles
from distaccum.comm import pieces
from distaccum.checkpoint import CheckpointManager
import workload
from common import (
    ALLREDUCE_EVERY_MICRO_BATCH, CHIEF_RESULT, DISTACCUM, DISTACCUM_BFLOAT16, LAUNCHED_AT_VARIABLE,
    MICRO_BATCH_SIZE, NO_COMMUNICATION, positive_int, timeline_path,
)


def start_horovod():
    """Start distaccum's Horovod backend; return `horovod.tensorflow` for what the benchmark does
    itself (timelines, barriers, baseline (a))."""
    distaccum.init()
    if distaccum.num_workers() < 2:
        raise SystemExit("workers.py: error: this subcommand needs 2 workers (horovodrun -np 2)")
    import horovod.tensorflow as hvd  # here only: single-process figures must not load Horovod

    return hvd


def barrier(hvd) -> None:
    hvd.allreduce(tf.constant(0.0), name="benchmark_barrier")


def write_chief(out: Path, payload) -> None:
    if distaccum.rank() == 0:
        (out / CHIEF_RESULT).write_text(json.dumps(payload))


def communication(args) -> None:
    """Each k trains the same number of micro-batches with Horovod's timeline recording."""
    hvd = start_horovod()
    dataset = workload.synthetic_micro_batches()
    runs = []
    for k in args.accumulation_steps:
        trainer = workload.synthetic_trainer(k)
        trainer.prepare(dataset.element_spec)  # keeps the start-up broadcast off this timeline
        hvd.start_timeline(str(timeline_path(args.out, k)))
        barrier(hvd)
        history = trainer.fit(dataset, update_steps=args.micro_batches // k,
                              log_interval=args.micro_batches)
        barrier(hvd)
        hvd.stop_timeline()
        runs.append({"k": k, "updates": history.update_steps, "samples": history.samples})
    write_chief(args.out, runs)


class UpdateClock(distaccum.Callback):
    """Callback summing distaccum's own split of each update: micro-steps vs update step."""

    def __init__(self) -> None:
        super().__init__()
        self.compute_seconds = 0.0
        self.update_seconds = 0.0

    def on_update(self, record) -> None:
        self.compute_seconds += record.compute_seconds
        self.update_seconds += record.communication_seconds


class SlowLinkBench:
    """distaccum, baseline (a) and baseline (b) at each k, side by side in one pair of workers.

    Synchronises and takes the slower worker's time through distaccum's own backend, so the same
    bench runs on Horovod and on mpi4py; baseline (a) is a Horovod loop (Horovod backend only).
    """

    def __init__(self, accumulation_steps, methods) -> None:
        self._backend = comm.current()
        self._dataset = workload.synthetic_micro_batches()
        self._iterator = iter(self._dataset)
        self._baseline = None
        if ALLREDUCE_EVERY_MICRO_BATCH in methods:
            import horovod.tensorflow as hvd  # baseline (a) is a hand-written Horovod loop

            self._baseline = workload.AllreduceEveryMicroBatch(
                workload.synthetic_model(), workload.make_optimizer(),
                workload.classification_loss(), hvd)
        self._trainers = {
            (k, method): workload.synthetic_trainer(
                k, communicate=method != NO_COMMUNICATION,
                allreduce_dtype="bfloat16" if method == DISTACCUM_BFLOAT16 else "float32")
            for k in accumulation_steps
            for method in (DISTACCUM, DISTACCUM_BFLOAT16, NO_COMMUNICATION) if method in methods
        }

    def warm_up(self) -> None:
        """One update each, so tracing and first connections stay out of the timings (the
        baseline's step functions serve every k)."""
        if self._baseline is not None:
            self._baseline.run(self._iterator, 1, 1)
        for trainer in self._trainers.values():
            self._fit(trainer, 1)

    def measure(self, method: str, k: int, updates: int) -> dict:
        """Seconds for `updates` windows (the slower worker's), and distaccum's own split."""
        self._slowest(0.0)  # a barrier
        if method == ALLREDUCE_EVERY_MICRO_BATCH:
            started = time.perf_counter()
            self._baseline.run(self._iterator, k, updates)
            timing = {"seconds": time.perf_counter() - started}
        else:
            timing = self._fit(self._trainers[k, method], updates)
        timing["seconds"] = self._slowest(timing["seconds"])
        return timing

    def _slowest(self, seconds: float) -> float:
        return float(self._backend.max_all(tf.constant([seconds], tf.float64))[0])

    def _fit(self, trainer, updates: int) -> dict:
        clock = UpdateClock()
        history = trainer.fit(self._dataset, update_steps=updates, callbacks=[clock],
                              log_interval=updates)
        return {"seconds": history.seconds, "compute_seconds": clock.compute_seconds,
                "update_seconds": clock.update_seconds}


def timed_updates(method: str, k: int, args) -> int:
    """About `--micro-batches` micro-batches per run. distaccum and (b) run at least
    `--min-updates` windows, so no single allreduce decides; (a) allreduces every micro-batch,
    so its runs already average over that many collectives."""
    windows = math.ceil(args.micro_batches / k)
    return windows if method == ALLREDUCE_EVERY_MICRO_BATCH else max(windows, args.min_updates)


def slow_link(args) -> None:
    """Repeats of: for each k, distaccum, then (a), then (b) (those of `--methods`); timings
    interleaved, so each repeat's ratios compare runs made moments apart under the same load."""
    distaccum.init()
    if distaccum.num_workers() < 2:
        raise SystemExit("workers.py: error: this subcommand needs 2 workers")
    bench = SlowLinkBench(args.accumulation_steps, args.methods)
    bench.warm_up()
    measurements = []
    for repeat in range(args.repeats):
        for k in args.accumulation_steps:
            for method in args.methods:
                updates = timed_updates(method, k, args)
                samples = distaccum.num_workers() * MICRO_BATCH_SIZE * k * updates
                measurements.append({"repeat": repeat, "k": k, "method": method,
                                     "updates": updates, "samples": samples,
                                     **bench.measure(method, k, updates)})
    write_chief(args.out, measurements)


def keras_runners(x, y) -> dict:
    """Keras 3's own compiled training step on the batch: `train_on_batch` and `fit`."""
    model = workload.synthetic_model()
    model.compile(optimizer=workload.make_optimizer(), loss=workload.classification_loss())
    repeated = workload.without_autotune(tf.data.Dataset.from_tensors((x, y)).repeat())

    def train_on_batch(steps: int) -> None:
        for _ in range(steps):
            model.train_on_batch(x, y)

    def fit(steps: int) -> None:
        model.fit(repeated, steps_per_epoch=steps, epochs=1, verbose=0)

    return {"keras_train_on_batch": train_on_batch, "keras_fit": fit}


def distaccum_runners(x, y) -> dict:
    """distaccum's micro-step alone, and whole windows (micro-steps plus update) at k=1 and 8,
    the k=8 window also with one call per micro-batch and under the mixed_bfloat16 policy."""
    spec = (tf.TensorSpec.from_tensor(x), tf.TensorSpec.from_tensor(y))
    trainers = {name: workload.synthetic_trainer(k, precision=precision) for name, k, precision in
                (("micro_step", 1, "float32"), ("window_k1", 1, "float32"),
                 ("window_k8", 8, "float32"), ("window_k8_mixed_bfloat16", 8, "mixed_bfloat16"))}
    for trainer in trainers.values():
        trainer.prepare(spec)

    def micro_steps(steps: int) -> None:
        for _ in range(steps):
            trainers["micro_step"].micro_step(x, y)

    def windows(trainer, one_call: bool = True):
        """Windows as `fit` runs them (or with one call per micro-batch)."""
        def run(steps: int) -> None:
            stored = [(x, y, None)] * (trainer.accumulation_steps - 1)
            for _ in range(steps // trainer.accumulation_steps):
                if one_call:
                    trainer.micro_steps(stored)
                else:
                    for micro_batch in stored:
                        trainer.micro_step(*micro_batch)
                trainer.update_step(last_micro_batch=(x, y, None))
        return run

    return {"micro_step": micro_steps,
            **{name: windows(trainers[name]) for name in ("window_k1", "window_k8")},
            "window_k8_call_each": windows(trainers["window_k8"], one_call=False),
            "window_k8_mixed_bfloat16": windows(trainers["window_k8_mixed_bfloat16"])}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accumulated_update(model, micro_batch: int, k: int):
    """distaccum: k micro-steps on micro-batches of `micro_batch` samples, then the update."""
    x, y = workload.random_images(micro_batch)
    trainer = distaccum.Trainer(model, workload.make_optimizer(),
                                loss=workload.classification_loss(), accumulation_steps=k)
    trainer.prepare((tf.TensorSpec.from_tensor(x), tf.TensorSpec.from_tensor(y)))

    def step() -> None:
        for _ in range(k):
            trainer.micro_step(x, y)
        trainer.update_step()

    return step


def direct_update(model, batch: int):
    """One Keras training step on the whole batch of `batch` samples."""
    x, y = workload.random_images(batch)
    model.compile(optimizer=workload.make_optimizer(), loss=workload.classification_loss())
    return lambda: model.train_on_batch(x, y)


def memory(args) -> None:
    """Peak memory of one update of the conv model, done one way; a fresh process per run,
    since a process's peak never goes down."""
    distaccum.init()
    model = workload.conv_model(args.conv_layers, args.conv_filters)
    k = args.accumulation_steps
    if args.mode == "accumulate":
        step = accumulated_update(model, args.micro_batch, k)
    else:
        step = direct_update(model, args.micro_batch * k)
    before_training = peak_rss_mb()
    step()
    write_chief(args.out, {"peak_mb": peak_rss_mb(), "before_training_mb": before_training})


def resident_mb() -> float:
    """This process's resident memory now (resident pages in /proc/self/statm): unlike the peak,
    it goes down again when memory is freed, so it shows what a run keeps."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def dense_stack(width: int, layers: int) -> keras.Model:
    """`layers` Dense layers of `width` units on a `width`-wide input: nearly all its memory is
    weights (≈ layers × width² floats), so growth over it reads as bytes per parameter."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((width,)),
                             *(keras.layers.Dense(width) for _ in range(layers))])


# The embedding-dominated model: tokens per sample, and the width of its vectors.
TOKENS, EMBEDDING_WIDTH = 16, 256


def embedding_table(width: int, layers: int) -> keras.Model:
    """As many parameters as `dense_stack(width, layers)`, nearly all in one `Embedding` (a
    GPT-2's table holds most of its weights): `TOKENS` token ids in, their mean vector through
    one Dense layer out. Its gradient is sparse (`tf.IndexedSlices`)."""
    keras.utils.set_random_seed(0)
    vocabulary = layers * width * width // EMBEDDING_WIDTH
    return keras.Sequential([keras.Input((TOKENS,), dtype="int32"),
                             keras.layers.Embedding(vocabulary, EMBEDDING_WIDTH),
                             keras.layers.GlobalAveragePooling1D(),
                             keras.layers.Dense(EMBEDDING_WIDTH)])


MODELS = {"dense": dense_stack, "embedding": embedding_table}


def memory_per_parameter(args) -> None:
    """RSS growth over the built, compiled model (Adam, mse) of one run, Keras's own `fit` or
    distaccum's, in a fresh process: what it keeps after the last update, and its peak, a
    checkpoint written at the end (distaccum's) included.

    Every rank holds `--updates` global batches of its own random samples; distaccum's
    `micro_batches` reads this worker's share of them, Keras's `fit` (one process) all of them.
    """
    distaccum.init()
    model = MODELS[args.model](args.width, args.layers)
    weights_mb = sum(math.prod(variable.shape) * np.dtype(variable.dtype).itemsize
                     for variable in model.trainable_variables) / 2**20
    rng = np.random.default_rng(distaccum.rank())
    samples = args.global_batch * args.updates
    if args.model == "embedding":
        x = rng.integers(0, model.layers[0].input_dim, size=(samples, TOKENS), dtype=np.int32)
    else:
        x = rng.normal(size=(samples, args.width)).astype("float32")
    y = rng.normal(size=(samples, model.output_shape[-1])).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    base_mb = resident_mb()
    if args.mode == "keras":
        model.fit(x, y, batch_size=args.global_batch, epochs=1, verbose=0, shuffle=False)
        accumulation_steps, gradient_sums = None, 0
    else:
        trainer = distaccum.Trainer.from_compiled(
            model, global_batch_size=args.global_batch,
            shard_optimizer_state=args.mode == "distaccum-sharded")
        checkpoints = CheckpointManager(args.out / "checkpoints")

        def save_checkpoint(position):
            checkpoints.save_from_every_worker(position, trainer.training_state, {},
                                               chief=distaccum.is_chief(),
                                               transfer=trainer.slot_transfer)

        trainer.fit(distaccum.micro_batches((x, y), args.micro_batch), epochs=1,
                    log_interval=10**9, save_checkpoint=save_checkpoint)
        accumulation_steps, gradient_sums = trainer.accumulation_steps, trainer.gradient_sums
    (args.out / f"rank{distaccum.rank()}.json").write_text(json.dumps({
        "workers": distaccum.num_workers(), "k": accumulation_steps, "weights_mb": weights_mb,
        "gradient_sums": gradient_sums,
        "base_mb": base_mb, "steady_mb": resident_mb(), "peak_mb": peak_rss_mb(),
    }))


class FirstUpdateClock(distaccum.Callback):
    """Callback noting the wall-clock time of the first update."""

    def __init__(self) -> None:
        super().__init__()
        self.first_update_at: float | None = None

    def on_update(self, record) -> None:
        if self.first_update_at is None:
            self.first_update_at = time.time()


def startup(args) -> None:
    """Seconds from the launch (stamped by startup.py) to this worker's first update; every
    import of this script counts, as it would for a user's."""
    launched_at = float(os.environ[LAUNCHED_AT_VARIABLE])
    distaccum.init()
    clock = FirstUpdateClock()
    trainer = workload.synthetic_trainer(args.accumulation_steps)
    trainer.fit(workload.synthetic_micro_batches(), update_steps=1, callbacks=[clock])
    seconds = clock.first_update_at - launched_at
    (args.out / f"rank{distaccum.rank()}.json").write_text(json.dumps({"seconds": seconds}))


def record_files(args) -> None:
    """Write the data figure's TFRecord files, `OUT/records-N` for each size N, and the same
    samples in the other kinds beside them (one process, before any measured run)."""
    for samples in args.samples:
        workload.write_record_files(args.out / f"records-{samples}", samples, args.files,
                                    args.seed)
        workload.write_other_kinds(args.out / f"records-{samples}", samples, args.files,
                                   args.seed)


class ParseProbe:
    """Counts, inside `parse`, the records this worker parses, in all and per sample number.

    Two `tf.Variable` updates per record, made in tf.data's parallel map: cheap, but the
    throughput runs go without it all the same.
    """

    def __init__(self, num_samples: int) -> None:
        self.parsed = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.per_sample = tf.Variable(tf.zeros([num_samples], tf.int32), trainable=False)

    def parse(self, record):
        image, label, sample_id = workload.parse_example(record)
        counted = [self.parsed.assign_add(1),
                   self.per_sample.scatter_nd_add([[sample_id]], [1])]
        with tf.control_dependencies(counted):
            return tf.identity(image), tf.identity(label)

    def snapshot(self) -> tuple[int, np.ndarray]:
        return int(self.parsed.numpy()), self.per_sample.numpy()


class RecordsRead:
    """Counts the records (and bytes) this worker's distaccum reader takes from the files (whole
    chunks of `order.CHUNK_RECORDS`: a sample read is not yet a sample parsed), by wrapping the
    module's chunk splitter; distaccum's own files are not touched."""

    def __init__(self) -> None:
        self.records = self.bytes = 0
        split = recordfiles._split_records

        def counting_split(*arguments):
            records = split(*arguments)
            self.records += len(records)
            self.bytes += len(arguments[0])  # the chunk's bytes, framing included
            return records

        recordfiles._split_records = counting_split


class KindReads:
    """Counts what this worker's distaccum reader takes from a kind other than record files:
    samples decoded (and which), and bytes read from storage (image files opened; Parquet row
    groups decoded, at their compressed size, with their rows; source rows).

    Wraps the pipeline's `reader`, and for tables the row-group decode; the counts are taken
    by the reading thread, before any sample is parsed.
    """

    def __init__(self, kind: str, micro_batches) -> None:
        samples = micro_batches.samples
        self.kind, self.num_samples = kind, micro_batches.num_samples
        self.per_sample = np.zeros(self.num_samples, np.int64)
        self.records = self.bytes = 0
        reader = samples.reader
        sizes = ([os.path.getsize(path) for path in samples.paths] if kind == "images" else None)
        row_bytes = math.prod(workload.RECORD_IMAGE_SHAPE) + 4

        def counting_reader(*arguments):
            read = reader(*arguments)

            def counted(window):
                self.per_sample[window] += 1
                if kind == "images":
                    self.bytes += sum(sizes[i] for i in window.tolist())
                if kind != "tables":
                    self.records += len(window)
                    self.bytes += 0 if kind == "images" else row_bytes * len(window)
                return read(window)
            return counted

        samples.reader = counting_reader
        if kind == "tables":
            from distaccum import tables
            group = tables.TableSamples._group

            def counting_group(table_samples, index, held):
                if index not in held.groups:
                    file, g = table_samples._groups[index]
                    metadata = tables._open(table_samples.files.paths[file]).metadata
                    row_group = metadata.row_group(g)
                    self.records += row_group.num_rows
                    self.bytes += sum(  # the column chunks decoded, as stored
                        row_group.column(c).total_compressed_size
                        for c in range(row_group.num_columns)
                        if row_group.column(c).path_in_schema in table_samples.columns)
                return group(table_samples, index, held)

            tables.TableSamples._group = counting_group

    def snapshot(self) -> tuple[int, np.ndarray]:
        return int(self.per_sample.sum()), self.per_sample.copy()


class EpochClock(keras.callbacks.Callback):
    """Per epoch: seconds from its start to its last update (so the input pipeline's start-up
    counts, but not deleting its iterator after the epoch), seconds from that update to the
    epoch's end (`ending_seconds`: the iterator's deletion), and what the probes counted."""

    def __init__(self, probe: ParseProbe | None, reads: RecordsRead | None) -> None:
        super().__init__()
        self.probe, self.reads = probe, reads
        self.epochs: list[dict] = []
        self._started = self._last_update = 0.0
        self._at_start = None

    def _counts(self):
        return (self.probe.snapshot() if self.probe else (0, None),
                self.reads.records if self.reads else 0)

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._at_start = self._counts()
        self._bytes_at_start = getattr(self.reads, "bytes", 0)
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self._last_update = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None) -> None:
        (parsed, per_sample), read = self._counts()
        (parsed_before, per_sample_before), read_before = self._at_start
        entry = {"seconds": self._last_update - self._started, "loss": float(logs["loss"]),
                 "ending_seconds": time.perf_counter() - self._last_update}
        if self.probe:
            times = per_sample - per_sample_before
            entry.update(parsed=parsed - parsed_before,
                         samples=np.repeat(np.arange(len(times)), times).tolist())
        if self.reads:
            entry["read"] = read - read_before
            entry["bytes"] = getattr(self.reads, "bytes", 0) - self._bytes_at_start
        self.epochs.append(entry)


def data_pipeline(pipeline: str, kind: str, records: Path, parse):
    """This worker's micro-batches of `kind` in `records` (the directory `record-files` wrote):
    distaccum's `micro_batches`, or the hand-written tf.data pipeline."""
    shuffle_buffer = order.DEFAULT_SHUFFLE_BUFFER // distaccum.num_workers()
    if kind != "records":
        if pipeline == "distaccum":
            return workload.distaccum_kind_micro_batches(kind, records / kind)
        return workload.expert_kind_micro_batches(kind, records / kind, distaccum.num_workers(),
                                                  distaccum.rank(), shuffle_buffer)
    if pipeline == "distaccum":
        return distaccum.micro_batches(str(records / "*.tfrecord"), MICRO_BATCH_SIZE,
                                       parse=parse, index_file=records / "index.json")
    manifest = json.loads((records / workload.RECORDS_MANIFEST).read_text())
    return workload.expert_micro_batches(
        records, manifest, distaccum.num_workers(), distaccum.rank(), parse,
        shuffle_buffer=shuffle_buffer)


def data_trainer(accumulation_steps: int) -> distaccum.Trainer:
    """The data figure's trainer: the small conv net, always from the same seed."""
    return distaccum.Trainer(workload.small_conv_model(), workload.make_optimizer(),
                             loss=workload.classification_loss(),
                             accumulation_steps=accumulation_steps)


def data_share(args) -> None:
    """distaccum's pipeline for `--epochs` epochs on each of `--kinds` in turn: per epoch, the
    samples this worker parsed (and which) and read from storage; then its peak memory so far
    (a kind's own peak when it is the process's only kind)."""
    distaccum.init()
    results = {}
    for kind in args.kinds:
        if kind == "records":
            num_samples = json.loads((args.records / workload.RECORDS_MANIFEST).read_text()
                                     )["samples"]
            probe, reads = ParseProbe(num_samples), RecordsRead()
            micro_batches = data_pipeline("distaccum", "records", args.records, probe.parse)
        else:
            micro_batches = data_pipeline("distaccum", kind, args.records, None)
            num_samples = micro_batches.num_samples
            probe = reads = KindReads(kind, micro_batches)
        trainer = data_trainer(args.accumulation_steps)
        clock = EpochClock(probe, reads)
        before_training = peak_rss_mb()
        trainer.fit(micro_batches, epochs=args.epochs, callbacks=[clock], log_interval=10**9)
        results[kind] = {
            "num_workers": distaccum.num_workers(), "num_samples": num_samples,
            "data_bytes": data_bytes(kind, args.records), "epochs": clock.epochs,
            "peak_mb": peak_rss_mb(), "before_training_mb": before_training}
    (args.out / f"rank{distaccum.rank()}.json").write_text(json.dumps(results))


def data_bytes(kind: str, records: Path) -> int:
    """The bytes a kind's samples take in storage (what a worker's share of reads is measured
    against): the files of records, images, tables; the source's rows."""
    if kind == "source":
        return int(sum(np.load(records / "source" / name, mmap_mode="r").nbytes
                       for name in ("images.npy", "labels.npy")))
    pattern = {"records": "*.tfrecord", "images": "*/*.png", "tables": "*.parquet"}[kind]
    where = records if kind == "records" else records / kind
    return sum(path.stat().st_size for path in where.glob(pattern))


def data_throughput(args) -> None:
    """Both pipelines of each of `--kinds` in one pair of workers, each with its own trainer: a
    warm-up of `--warm-up-updates` updates each (tracing), then `--repeats` rounds of one epoch
    each, the order swapped every round; per epoch, the seconds from its start to its last update
    and `History.seconds`. Nothing is counted."""
    distaccum.init()
    measurements = []
    for kind in args.kinds:
        runners = {pipeline: (data_pipeline(pipeline, kind, args.records, workload.parse_record),
                              data_trainer(args.accumulation_steps))
                   for pipeline in ("distaccum", "expert")}
        for source, trainer in runners.values():
            trainer.fit(source, update_steps=args.warm_up_updates, log_interval=10**9)
        for repeat in range(args.repeats):
            for pipeline in list(runners)[::1 if repeat % 2 == 0 else -1]:
                source, trainer = runners[pipeline]
                clock = EpochClock(None, None)
                history = trainer.fit(source, epochs=1, callbacks=[clock], log_interval=10**9)
                measurements.append({"kind": kind, "repeat": repeat, "pipeline": pipeline,
                                     "samples": history.samples,
                                     "epoch_seconds": clock.epochs[0]["seconds"],
                                     "ending_seconds": clock.epochs[0]["ending_seconds"],
                                     "fit_seconds": history.seconds})
    (args.out / f"rank{distaccum.rank()}.json").write_text(json.dumps(measurements))


def sparse_exchange(args) -> None:
    """Bytes one update step of an Embedding text classifier sends, per embedding width, with
    the row exchange off (the dense table in the one allreduce) and on (the touched rows in an
    allgather beside it): the mpi4py backend's own counts over a fit of 3 updates minus a fit
    of 1, so what a fit does once drops out (with the rows, after a first fit of 1 update, which
    goes dense); beside `Trainer.allreduce_per_update` and, for the rows, what this rank's
    windows' distinct tokens should cost. With `--timed-updates`, also seconds per update, each
    time the mean over a fit of that many updates (the window's micro-steps and its update step,
    as `UpdateClock` sums them), the two exchanges in turn, `--repeats` times."""
    distaccum.init()
    backend = comm.current()
    if distaccum.num_workers() < 2 or not hasattr(backend, "collective_bytes"):
        raise SystemExit("workers.py: error: sparse-exchange needs 2 workers on the mpi4py backend "
                         "(mpirun -np 2, DISTACCUM_BACKEND=mpi)")
    rng = np.random.default_rng(distaccum.rank())
    k, samples = 2, 4 * MICRO_BATCH_SIZE
    tokens = rng.integers(0, args.vocabulary, size=(samples, args.length))
    labels = rng.integers(0, 2, size=(samples, 1)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((tokens.astype("int32"), labels))
    dataset = dataset.batch(MICRO_BATCH_SIZE).repeat()
    # A fit of 3 updates minus a fit of 1 sees this rank's first and second window once each.
    windows_rows = [np.unique(tokens[i * k * MICRO_BATCH_SIZE:(i + 1) * k * MICRO_BATCH_SIZE]).size
                    for i in range(2)]

    def fit(trainer, updates: int) -> float:
        """Seconds per update of a fit of `updates`."""
        clock = UpdateClock()
        trainer.fit(dataset, update_steps=updates, log_interval=10**9, callbacks=[clock])
        return (clock.compute_seconds + clock.update_seconds) / updates

    results = []
    for width in args.widths:
        trainers = {}
        for row_exchange in (False, True):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((args.length,), dtype="int32"),
                                      keras.layers.Embedding(args.vocabulary, width),
                                      keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])
            trainer = trainers[row_exchange] = distaccum.Trainer(
                model, keras.optimizers.SGD(0.1),
                loss=keras.losses.BinaryCrossentropy(from_logits=True), accumulation_steps=k,
                row_exchange=row_exchange)
            if row_exchange:
                fit(trainer, 1)  # the first update goes dense
            sent = {}
            for updates in (1, 3):
                before = (dict(backend.collective_counts), dict(backend.collective_bytes))
                fit(trainer, updates)
                sent[updates] = {
                    f"{kind}{suffix}": (totals[kind] - start.get(kind, 0)) for kind in
                    ("allreduce", "allgather")
                    for suffix, totals, start in (("s", backend.collective_counts, before[0]),
                                                  ("_bytes", backend.collective_bytes, before[1]))}
            per_update = {name: (sent[3][name] - sent[1][name]) / 2 for name in sent[3]}
            results.append({
                "width": width, "row_exchange": row_exchange, "parameters": model.count_params(),
                "embedding_parameters": args.vocabulary * width,
                "allreduces_per_update": per_update["allreduces"],
                # The sums in groups of 32 MiB (`comm.sum_in_place`); as rows, all but the table.
                "expected_allreduces": len(list(pieces.bounded_groups(
                    model.trainable_variables[1:] if row_exchange else
                    model.trainable_variables))),
                "allgathers_per_update": per_update["allgathers"],
                "bytes_per_update": per_update["allreduce_bytes"] + per_update["allgather_bytes"],
                "allgather_bytes_per_update": per_update["allgather_bytes"],
                "distinct_rows_per_window": windows_rows,
                "expected_allgather_bytes": sum(4 + u * (4 + 4 * width) for u in windows_rows) / 2,
                "trainer_allreduce_per_update": list(trainer.allreduce_per_update),
                "seconds_per_update": [],
            })
        timed = {r["row_exchange"]: r["seconds_per_update"] for r in results[-2:]}
        for _ in range(args.repeats if args.timed_updates else 0):
            for row_exchange, trainer in trainers.items():
                timed[row_exchange].append(fit(trainer, args.timed_updates))
    write_chief(args.out, results)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    figures = {}
    for name, run in (("communication", communication), ("slow-link", slow_link),
                      ("memory", memory), ("memory-per-parameter", memory_per_parameter),
                      ("startup", startup),
                      ("record-files", record_files), ("data-share", data_share),
                      ("data-throughput", data_throughput),
                      ("sparse-exchange", sparse_exchange)):
        figures[name] = commands.add_parser(name, help=run.__doc__.splitlines()[0])
        figures[name].add_argument("--out", type=Path, required=True, help="output directory")
        figures[name].set_defaults(run=run)
    figures["communication"].add_argument("--accumulation-steps", type=positive_int, nargs="+")
    figures["communication"].add_argument("--micro-batches", type=positive_int, required=True)
    figures["slow-link"].add_argument("--accumulation-steps", type=positive_int, nargs="+")
    for option in ("--repeats", "--micro-batches", "--min-updates"):
        figures["slow-link"].add_argument(option, type=positive_int, required=True)
    methods = (DISTACCUM, ALLREDUCE_EVERY_MICRO_BATCH, NO_COMMUNICATION)
    figures["slow-link"].add_argument("--methods", nargs="+", choices=(*methods, DISTACCUM_BFLOAT16),
                                      default=methods)
    figures["memory"].add_argument("--mode", choices=("accumulate", "direct"), required=True)
    for option in ("--micro-batch", "--accumulation-steps", "--conv-layers", "--conv-filters"):
        figures["memory"].add_argument(option, type=positive_int, required=True)
    figures["memory-per-parameter"].add_argument(
        "--mode", choices=("keras", "distaccum", "distaccum-sharded"), required=True)
    for option in ("--width", "--layers", "--global-batch", "--updates"):
        figures["memory-per-parameter"].add_argument(option, type=positive_int, required=True)
    figures["memory-per-parameter"].add_argument("--model", choices=tuple(MODELS),
                                                 default="dense")
    figures["memory-per-parameter"].add_argument(
        "--micro-batch", type=positive_int, required=True,
        help="distaccum's, per worker (Keras's `fit` trains on whole global batches)")
    figures["startup"].add_argument("--accumulation-steps", type=positive_int, required=True)
    figures["record-files"].add_argument("--samples", type=positive_int, nargs="+",
                                         required=True, help="one set of files per size")
    figures["record-files"].add_argument("--files", type=positive_int, required=True)
    figures["record-files"].add_argument("--seed", type=int, default=0)
    for name in ("data-share", "data-throughput"):
        figures[name].add_argument("--records", type=Path, required=True,
                                   help="a directory record-files wrote")
        figures[name].add_argument("--accumulation-steps", type=positive_int, required=True)
    figures["data-share"].add_argument("--epochs", type=positive_int, required=True)
    for name in ("data-share", "data-throughput"):
        figures[name].add_argument("--kinds", choices=workload.DATA_KINDS, nargs="+",
                                   default=["records"])
    for option in ("--repeats", "--warm-up-updates"):
        figures["data-throughput"].add_argument(option, type=positive_int, required=True)
    figures["sparse-exchange"].add_argument("--vocabulary", type=positive_int, required=True)
    figures["sparse-exchange"].add_argument("--widths", type=positive_int, nargs="+",
                                            required=True)
    figures["sparse-exchange"].add_argument("--length", type=positive_int, required=True,
                                            help="tokens per sample")
    figures["sparse-exchange"].add_argument("--timed-updates", type=int, default=0,
                                            help="updates timed per exchange (0: bytes only)")
    figures["sparse-exchange"].add_argument("--repeats", type=positive_int, default=1,
                                            help="timings per exchange")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    workload.configure_threads()
    args.run(args)


if __name__ == "__main__":
    main()
