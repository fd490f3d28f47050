"""Every collective of this launch's backend on rank-dependent inputs, eager and inside a
`tf.function`: each rank saves what it got, for tests/test_comm.py to compare with closed forms.

    python collectives.py --out DIR   (under horovodrun or mpirun; or alone, single-process)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from distaccum import comm
from distaccum.comm import pieces


def run(backend) -> dict[str, np.ndarray]:
    """Rank r contributes r + 1 (and r + 1 rows to a gather), so every result has a closed form
    in the worker count alone."""
    r = backend.rank()
    one = float(r + 1)
    vector = tf.fill([3], one)
    matrix = tf.reshape(tf.range(4, dtype=tf.float32), [2, 2]) * one
    summed = tf.function(lambda: backend.sum_all([vector, matrix], "contract"))()
    narrow = backend.sum_all([tf.cast(vector, tf.float16), matrix], "contract_narrow")
    rows = tf.fill([r + 1, 2], one)
    gathered = tf.function(lambda: backend.gather_all([rows], "contract"))()
    broadcast = backend.broadcast([vector, tf.constant([[r, -r]], tf.int64)])
    # Rank q's segment holds q values (rank 0's none). The first reduce-scatter is only waited
    # for, as a round of sharded state's is: every rank must run it all the same.
    segments = [tf.fill([q], one) for q in range(backend.num_workers())]

    def waited_for():
        first = backend.reduce_scatter(segments, "contract_waited_for")
        with tf.control_dependencies([first]):
            return backend.reduce_scatter([2 * s for s in segments], "contract")

    scattered = tf.function(waited_for)()
    # In place, in groups: 16-byte groups put each variable in a group of its own, and the table
    # (40 bytes, above CUT_BYTES) travels in ranges of two rows.
    pieces.GROUP_BYTES = pieces.CUT_BYTES = 16
    table, scalar = tf.Variable(tf.reshape(tf.range(10.0), [5, 2]) * one), tf.Variable(one)
    others = tf.function(lambda: comm.sum_in_place(backend, [table, scalar], [vector],
                                                   "contract_in_place", tf.float32))()
    owned = [keras.Variable(np.full([5, 2], one, "float32")), keras.Variable(r, dtype="int64")]
    comm.broadcast_in_place(backend, owned)
    return {
        "sum_vector": summed[0].numpy(), "sum_matrix": summed[1].numpy(),
        "narrow_vector": narrow[0].numpy(), "narrow_dtype": np.array(narrow[0].dtype.name),
        "narrow_matrix": narrow[1].numpy(),
        "max": backend.max_all(tf.constant([one, -one])).numpy(),
        "gathered": np.concatenate([piece.numpy().reshape(-1) for piece in gathered[0]]),
        "gathered_rows": np.array([int(piece.shape[0]) for piece in gathered[0]]),
        "scattered": scattered.numpy(),
        "broadcast_vector": broadcast[0].numpy(), "broadcast_int": broadcast[1].numpy(),
        "in_place_table": table.numpy(), "in_place_scalar": scalar.numpy(),
        "in_place_others": others[0].numpy(),
        "broadcast_in_place_table": owned[0].numpy(), "broadcast_in_place_int": owned[1].numpy(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    backend = comm.init()
    results = run(backend)
    np.savez(args.out / f"rank{backend.rank()}.npz", backend=np.array(backend.name),
             workers=np.array(backend.num_workers()), **results)


if __name__ == "__main__":
    main()
