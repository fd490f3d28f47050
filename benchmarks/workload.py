"""The measured workload, shared by the benchmark workers: threads, data, models and baselines.

Imports TensorFlow, so only the measured processes (`workers.py`) use it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import distaccum
from distaccum import catalog, comm

from common import MICRO_BATCH_SIZE, TABLE_ROW_GROUP

IMAGE_SHAPE = (64, 64, 3)
# The data figure's record files: 32×32×3 uint8 images, 10 classes.
RECORD_IMAGE_SHAPE = (32, 32, 3)
RECORDS_MANIFEST = "records.json"  # beside the files: their names and records each
RECORD_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "id": tf.io.FixedLenFeature([], tf.int64),
}


def configure_threads() -> None:
    """One intra-op and one inter-op thread per process, before TensorFlow runs any op.

    Two workers on a 2-core machine then use one core each instead of fighting over both, and the
    single-process figures compare like with like.
    """
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def classification_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)


def synthetic_model(seed: int = 0) -> keras.Model:
    """The bundled ≈2.1 M-parameter MLP: 8.4 MB of gradients, enough for traffic to matter."""
    return catalog.build_model("synthetic_mlp", catalog.SYNTHETIC_FEATURES, seed)


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with tf.data's autotuning off.

    These pipelines have nothing to tune, and with it on, deleting an iterator (what `fit` does
    when it returns) sometimes waits out the tuner's current period, which grows with the
    iterator's age: 0.05 s after a 0.1 s run, 19 s after a 22 s one. The benchmarks time many
    short `fit`s, so that would be counted against them, while a hand-written loop's one
    long-lived iterator never pays it.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def synthetic_micro_batches(micro_batch_size: int = MICRO_BATCH_SIZE) -> tf.data.Dataset:
    """This worker's share of the synthetic training set as micro-batches, repeating forever.

    Only full micro-batches, so the samples of a run are exactly workers × micro-batch × steps.
    """
    split = catalog.load_dataset("synthetic")
    samples = distaccum.shard(tf.data.Dataset.from_tensor_slices((split.x_train, split.y_train)))
    micro_batches = samples.batch(micro_batch_size, drop_remainder=True).repeat().prefetch(2)
    return without_autotune(micro_batches)


def first_micro_batch(micro_batch_size: int = MICRO_BATCH_SIZE) -> tuple[tf.Tensor, tf.Tensor]:
    """One fixed synthetic micro-batch, for single-process timings that must exclude input."""
    split = catalog.load_dataset("synthetic")
    x, y = split.x_train[:micro_batch_size], split.y_train[:micro_batch_size]
    return tf.constant(x), tf.constant(y)


def synthetic_trainer(accumulation_steps: int, *, communicate: bool = True,
                      allreduce_dtype: str = "float32", precision: str = "float32"
                      ) -> distaccum.Trainer:
    """A distaccum Trainer on a fresh synthetic model.

    Args:
        accumulation_steps: k.
        communicate: False gives the compute limit, baseline (b): distaccum's own micro-step and
            update step with the single-process (identity) backend, so the run differs from the
            real one by the allreduce alone.
        allreduce_dtype: the type gradient sums travel in.
        precision: the Keras dtype policy the model is built under.
    """
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = synthetic_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    trainer = distaccum.Trainer(model, make_optimizer(), loss=classification_loss(),
                                accumulation_steps=accumulation_steps,
                                allreduce_dtype=allreduce_dtype)
    if not communicate:
        trainer._steps.backend = comm.SingleProcessBackend()  # the steps sum through it
    return trainer


def conv_model(layers: int, filters: int) -> keras.Model:
    """An activation-heavy model: every 3×3 convolution keeps a full 64×64×filters map per
    sample for the backward pass, while the weights stay tiny."""
    keras.utils.set_random_seed(0)
    convolutions = [
        keras.layers.Conv2D(filters, 3, padding="same", activation="relu") for _ in range(layers)
    ]
    return keras.Sequential([
        keras.Input(IMAGE_SHAPE), *convolutions,
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(catalog.NUM_CLASSES),
    ])


def random_images(batch_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Images and class ids for the conv model; memory, not learning, is measured with them."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, *IMAGE_SHAPE)).astype("float32")
    labels = rng.integers(0, catalog.NUM_CLASSES, size=batch_size).astype("int32")
    return tf.constant(images), tf.constant(labels)


class AllreduceEveryMicroBatch:
    """Baseline (a): the usual hand-written accumulation loop on Horovod.

    The blog recipe: a GradientTape per micro-batch, the gradients averaged over workers right
    away (`hvd.grouped_allreduce`, one collective for all tensors), summed in `tf.Variable`s, and
    their mean over the k micro-batches applied every k. Both steps are `tf.function`s. It moves
    k times the bytes distaccum moves per update: what distaccum's k-fold cut is measured against.

    Args:
        model, optimizer, loss: as for a Keras training step (a mean-reduced `loss`).
        hvd: the initialised `horovod.tensorflow` module.
    """

    def __init__(self, model: keras.Model, optimizer, loss, hvd) -> None:
        self._model = model
        self._optimizer = optimizer
        self._loss = loss
        self._hvd = hvd
        self._variables = model.trainable_variables
        optimizer.build(self._variables)
        self._sums = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
                      for v in self._variables]
        self._micro_step = tf.function(self._micro_step_body)
        self._apply = tf.function(self._apply_body)

    def run(self, iterator, accumulation_steps: int, updates: int) -> None:
        """`updates` windows of `accumulation_steps` micro-batches taken from `iterator`."""
        for _ in range(updates):
            for _ in range(accumulation_steps):
                self._micro_step(*next(iterator))
            self._apply(tf.constant(float(accumulation_steps)))

    def _micro_step_body(self, x, y):
        with tf.GradientTape() as tape:
            loss = self._loss(y, self._model(x, training=True))
        gradients = tape.gradient(loss, self._variables)
        averaged = self._hvd.grouped_allreduce(gradients, op=self._hvd.Average)
        for total, gradient in zip(self._sums, averaged):
            total.assign_add(gradient)

    def _apply_body(self, accumulation_steps):
        self._optimizer.apply([total / accumulation_steps for total in self._sums], self._variables)
        for total in self._sums:
            total.assign(tf.zeros_like(total))


def record_file_sizes(samples: int, files: int, seed: int) -> list[int]:
    """Records per file: `samples` in all, each file within about ±10 % of the mean, so that
    sharding whole files leaves the workers slightly uneven shares, as real files do."""
    weights = np.random.default_rng(seed).uniform(0.9, 1.1, files)
    bounds = np.round(np.cumsum(weights) / weights.sum() * samples).astype(np.int64)
    return np.diff(np.concatenate([[0], bounds])).tolist()


def record_file_samples(samples: int, files: int, seed: int):
    """Per record file, its (images, labels): the data figure's samples, which every kind of
    data holds alike."""
    rng = np.random.default_rng(seed)
    for size in record_file_sizes(samples, files, seed):
        yield (rng.integers(0, 256, size=(size, *RECORD_IMAGE_SHAPE), dtype=np.uint8),
               rng.integers(0, catalog.NUM_CLASSES, size=size))


def write_record_files(directory: Path, samples: int, files: int, seed: int) -> dict:
    """TFRecord files of `tf.train.Example`s (an image's raw bytes, a label, the sample's number
    0…samples−1 in file order), and a manifest naming them with their record counts."""
    directory.mkdir(parents=True, exist_ok=True)
    names, sizes, sample_id = [], record_file_sizes(samples, files, seed), 0
    for number, (images, labels) in enumerate(record_file_samples(samples, files, seed)):
        names.append(f"part-{number:05d}-of-{files:05d}.tfrecord")
        with tf.io.TFRecordWriter(str(directory / names[-1])) as writer:
            for image, label in zip(images, labels):
                writer.write(tf.train.Example(features=tf.train.Features(feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(
                        value=[image.tobytes()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                    "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[sample_id])),
                })).SerializeToString())
                sample_id += 1
    manifest = {"files": names, "records": sizes, "samples": samples, "seed": seed}
    (directory / RECORDS_MANIFEST).write_text(json.dumps(manifest))
    return manifest


# The other kinds of the data figure: the same samples as class folders of PNG files (listed
# by class: one-class chunks), Parquet files in row groups, and arrays behind `__getitem__`.
DATA_KINDS = ("records", "images", "tables", "source")
TABLE_FILES = 16


def write_other_kinds(directory: Path, samples: int, files: int, seed: int) -> None:
    """The record files' samples as `images/<label>/<id>.png`, `tables/part-*.parquet` (image
    bytes, label, id; row groups of `TABLE_ROW_GROUP`) and `source/{images,labels}.npy`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    images, labels = (np.concatenate(parts) for parts in zip(
        *record_file_samples(samples, files, seed)))
    for label in range(catalog.NUM_CLASSES):
        (directory / "images" / f"{label}").mkdir(parents=True, exist_ok=True)
    for sample, (image, label) in enumerate(zip(images, labels)):
        (directory / "images" / f"{label}" / f"{sample:06d}.png").write_bytes(
            tf.io.encode_png(image).numpy())
    (directory / "tables").mkdir(exist_ok=True)
    for number, rows in enumerate(np.array_split(np.arange(samples), TABLE_FILES)):
        pq.write_table(pa.table({"image": [images[r].tobytes() for r in rows],
                                 "label": labels[rows], "id": rows}),
                       directory / "tables" / f"part-{number:05d}.parquet",
                       row_group_size=TABLE_ROW_GROUP)
    (directory / "source").mkdir(exist_ok=True)
    np.save(directory / "source" / "images.npy", images)
    np.save(directory / "source" / "labels.npy", labels.astype(np.int32))


class ArraySource:
    """The data figure's random-access source: `__getitem__(i)` reads sample i's bytes from the
    `.npy` file (`os.pread`, as a source reads storage; the labels are small and held), an image
    scaled to [0, 1] and its label. Not a memory map: its pages, once read, would count in the
    process's resident memory as the data grows, whoever reads them."""

    def __init__(self, directory: Path) -> None:
        images = np.load(directory / "images.npy", mmap_mode="r")
        self._offset, self._shape = images.offset, images.shape[1:]
        self._bytes = int(np.prod(self._shape))
        self.labels = np.load(directory / "labels.npy")
        self._file = os.open(directory / "images.npy", os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        raw = os.pread(self._file, self._bytes, self._offset + index * self._bytes)
        image = np.frombuffer(raw, np.uint8).reshape(self._shape)
        return image.astype(np.float32) / 255.0, self.labels[index]


def scaled(x, y):
    """An image folder's pixels (0…255, as Keras decodes them) in [0, 1], as the model takes."""
    return x / 255.0, y


def parse_table_row(row: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """The `parse` of a Parquet row, for both pipelines: the image's bytes to float32 in
    [0, 1], its label."""
    image = tf.reshape(tf.io.decode_raw(row["image"], tf.uint8), RECORD_IMAGE_SHAPE)
    return tf.cast(image, tf.float32) / 255.0, tf.cast(row["label"], tf.int32)


def load_png(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The hand-written folder pipeline's decode: what Keras's reader does for one file
    (`decode_image`, `resize` to the size it has), its label from the folder's name."""
    image = tf.image.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, RECORD_IMAGE_SHAPE[:2])
    label = tf.strings.to_number(tf.strings.split(path, "/")[-2], tf.int32)
    return image / 255.0, label


def expert_kind_micro_batches(kind: str, directory: Path, num_workers: int, rank: int,
                              shuffle_buffer: int, seed: int = 0) -> tf.data.Dataset:
    """This worker's micro-batches of the other kinds, the way an expert writes the pipeline for
    the worker's own share: folders, `list_files` + `shard` + a shuffle of paths + a parallel
    decode; Parquet, `tf.data` over pyarrow batches of the worker's row groups; a random-access
    source, a parallel `py_function` over the worker's indices."""
    if kind == "images":
        paths = tf.data.Dataset.list_files(str(directory / "*" / "*.png"), shuffle=False)
        total = int(paths.cardinality())
        share = paths.shard(num_workers, rank).shuffle(shuffle_buffer, seed=seed + rank)
        samples = share.map(load_png, num_parallel_calls=tf.data.AUTOTUNE)
        count = len(range(rank, total, num_workers))
    elif kind == "tables":
        import pyarrow.parquet as pq
        groups = [(path, g) for path in sorted(directory.glob("*.parquet"))
                  for g in range(pq.ParquetFile(path).metadata.num_row_groups)]
        mine = groups[rank::num_workers]
        count = sum(pq.ParquetFile(p).metadata.row_group(g).num_rows for p, g in mine)

        def batches():
            for path, group in mine:
                batch = pq.ParquetFile(path).read_row_group(group, columns=["image", "label"])
                yield batch.column("image").to_numpy(), batch.column("label").to_numpy()

        rows = tf.data.Dataset.from_generator(batches, output_signature=(
            tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int64))).unbatch()
        samples = rows.shuffle(shuffle_buffer, seed=seed + rank).map(
            lambda image, label: parse_table_row({"image": image, "label": label}),
            num_parallel_calls=tf.data.AUTOTUNE)
    else:
        source = ArraySource(directory)
        indices = tf.data.Dataset.range(rank, len(source), num_workers)
        count = len(range(rank, len(source), num_workers))

        def read(index):
            image, label = tf.py_function(lambda i: source[int(i)], [index],
                                          [tf.float32, tf.int32])
            return tf.ensure_shape(image, RECORD_IMAGE_SHAPE), tf.ensure_shape(label, [])

        samples = indices.shuffle(shuffle_buffer, seed=seed + rank).map(
            read, num_parallel_calls=tf.data.AUTOTUNE)
    micro_batches = samples.batch(MICRO_BATCH_SIZE).prefetch(tf.data.AUTOTUNE)
    return micro_batches.apply(tf.data.experimental.assert_cardinality(
        math.ceil(count / MICRO_BATCH_SIZE)))


def distaccum_kind_micro_batches(kind: str, directory: Path) -> "distaccum.MicroBatches":
    """distaccum's micro-batches of the other kinds (the folder's pixels scaled as the expert
    scales them)."""
    if kind == "images":
        folder = distaccum.ImageFolder(f"{directory}/", image_size=RECORD_IMAGE_SHAPE[:2])
        return distaccum.micro_batches(folder, MICRO_BATCH_SIZE).map(
            lambda batches: batches.map(scaled))
    if kind == "tables":
        return distaccum.micro_batches(f"{directory}/*.parquet", MICRO_BATCH_SIZE,
                                       parse=parse_table_row)
    return distaccum.micro_batches(ArraySource(directory), MICRO_BATCH_SIZE)


def parse_example(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(image as float32 in [0, 1], label, sample number) of one serialized record."""
    example = tf.io.parse_single_example(record, RECORD_FEATURES)
    image = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), RECORD_IMAGE_SHAPE)
    return (tf.cast(image, tf.float32) / 255.0, tf.cast(example["label"], tf.int32),
            example["id"])


def parse_record(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The `parse` both pipelines run: a serialized record to (image, label)."""
    image, label, _ = parse_example(record)
    return image, label


def small_conv_model(seed: int = 0) -> keras.Model:
    """The data figure's model, the same for every pipeline: two 3×3 convolutions with max
    pooling and a dense layer on 32×32×3 images (≈ 16 k parameters)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(RECORD_IMAGE_SHAPE),
        keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(catalog.NUM_CLASSES),
    ])


# The hand-written pipeline's parallel reads: files read at once by `interleave`.
EXPERT_CYCLE_LENGTH = 8


def expert_micro_batches(directory: Path, manifest: dict, num_workers: int, rank: int,
                         parse, shuffle_buffer: int, seed: int = 0) -> tf.data.Dataset:
    """This worker's micro-batches the way an expert writes the pipeline by hand: the files
    sharded per worker before any shuffle, then the shard's files in a fresh order each epoch,
    `interleave` of `TFRecordDataset`s, a shuffle buffer of serialized records, a parallel
    `map(parse)`, `batch`, `prefetch`.

    The shard's size is known from the manifest (`assert_cardinality`), as an expert who wrote
    the files knows it, so `fit` need not count it by a pass over the data.
    """
    files = tf.data.Dataset.list_files(str(directory / "*.tfrecord"), shuffle=False)
    shard = files.shard(num_workers, rank)
    shard_records = sum(manifest["records"][rank::num_workers])
    records = shard.shuffle(len(manifest["files"]), seed=seed).interleave(
        tf.data.TFRecordDataset, cycle_length=EXPERT_CYCLE_LENGTH,
        num_parallel_calls=tf.data.AUTOTUNE)
    samples = records.shuffle(shuffle_buffer, seed=seed + rank).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE)
    micro_batches = samples.batch(MICRO_BATCH_SIZE).prefetch(tf.data.AUTOTUNE)
    return micro_batches.apply(tf.data.experimental.assert_cardinality(
        math.ceil(shard_records / MICRO_BATCH_SIZE)))
