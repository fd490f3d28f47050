"""Which columns of a row are a sample's x, y and sample_weight: `columns`, for Parquet or Arrow
IPC files and for random-access sources whose items are rows (a Hugging Face `datasets.Dataset`
gives a dict of column values per index).

    columns = {"x": "image", "y": "label"}            # a column as it is
    columns = {"x": ["age", "income"], "y": "churn"}  # columns stacked into one float32 vector
"""

from __future__ import annotations

import tensorflow as tf

from distaccum.recordfiles import ParseError

PARTS = ("x", "y", "sample_weight")


class ColumnsError(ParseError):
    """`columns` is not a mapping of parts to columns, or names a column the rows lack: one line,
    starting "columns: "."""


class Columns:
    """A sample from a row by column names.

    Args:
        columns: {"x": a column or a list of them (stacked into one float32 vector), "y": a
            column, optionally "sample_weight": a column}.
        available: the rows' columns, and `where` they were found (a file, a source's first
            item), for the one line naming a column that is not among them.
    """

    def __init__(self, columns, available, where: str) -> None:
        if not isinstance(columns, dict) or not {"x", "y"} <= set(columns) \
                or not set(columns) <= set(PARTS):
            raise ColumnsError(f"columns: must be a dict with x and y (and optionally "
                               f"sample_weight). Received: columns={columns!r}")
        self._parts = []  # (names, stacked) per part of the sample
        for part in (p for p in PARTS if p in columns):
            names = [columns[part]] if isinstance(columns[part], str) else columns[part]
            if not isinstance(names, list) or not names \
                    or not all(isinstance(n, str) for n in names):
                raise ColumnsError(f"columns: {part} must be a column name or a list of them. "
                                   f"Received: {part}={columns[part]!r}")
            missing = [name for name in names if name not in available]
            if missing:
                raise ColumnsError(f"columns: {part}: column {missing[0]!r} is not in {where} "
                                   f"(its columns: {', '.join(map(str, available))})")
            self._parts.append((names, isinstance(columns[part], list)))
        self.read = list(dict.fromkeys(name for names, _ in self._parts for name in names))

    def sample(self, row: dict) -> tuple:
        """`(x, y[, sample_weight])` of one row (a dict of the `read` columns' tensors)."""
        return tuple(tf.stack([tf.cast(row[name], tf.float32) for name in names], axis=-1)
                     if stacked else row[names[0]] for names, stacked in self._parts)
