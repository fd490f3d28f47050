"""The bundled digits in each form a team keeps data in, for tests that train the main job's way
on them: class folders of PNG files, Parquet files, a random-access source, a mixture. Named by
import path in a config (`data_kinds:...`), so launched workers import them too."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from distaccum import catalog

# A digit's pixels are 0..16 (x × 16); a PNG holds them × 15.
PIXEL_SCALE = 16 * 15


def _digits():
    return catalog.load_dataset("digits")


def write_folder(root: Path) -> str:
    """The training digits as root/<label>/<i>.png (8×8 grayscale); returns "root/"."""
    split = _digits()
    for i, (x, y) in enumerate(zip(split.x_train, split.y_train)):
        folder = root / f"{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(x.reshape(8, 8, 1) * PIXEL_SCALE).astype("uint8")
        (folder / f"{i:04d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    return f"{root}/"


def write_parquet(root: Path, files: int = 3, row_group_size: int = 100) -> str:
    """The training digits as Parquet files (x: 64 float32, y: int32); returns their glob."""
    split = _digits()
    root.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(np.array_split(np.arange(len(split.y_train)), files)):
        table = pa.table({"x": pa.array(list(split.x_train[rows]), pa.list_(pa.float32(), 64)),
                          "y": pa.array(split.y_train[rows], pa.int32())})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=row_group_size)
    return f"{root}/*.parquet"


class DigitRows:
    """The digits as a random-access source (training or validation rows)."""

    def __init__(self, validation: bool = False) -> None:
        split = _digits()
        self.x, self.y = ((split.x_validation, split.y_validation) if validation
                          else (split.x_train, split.y_train))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


def digit_rows():
    """`dataset: data_kinds:digit_rows`: (training, validation) random-access sources."""
    return DigitRows(), DigitRows(validation=True)


def image_classifier() -> keras.Model:
    """digits_mlp's shape over an 8×8×1 image of 0..240 pixels, compiled as the bundled one."""
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / PIXEL_SCALE),
                              keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model
