"""distaccum on the exactness case, as its user writes it: the peers' scripts' counterpart.

Each worker trains its own shard of `case` (uneven, ragged, sample-weighted) with the compiled
model's SGD with momentum, k micro-batches per update, for 2 epochs; rank 0 writes the final
weights, `iterations` and its loss's `reduction` (the one `case.reference` must use) to
`OUT/result.json`. Runs under `mpirun` (mpi4py's collectives).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import case

PYTHON = Path(sys.executable)


def command(arguments: list[str]) -> list[str]:
    """Two workers under `mpirun` over TCP on the loopback (run with `DISTACCUM_BACKEND=mpi`)."""
    return [str(PYTHON.parent / "mpirun"), "-np", str(case.WORKERS), "--mca", "pml", "ob1",
            "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo",
            str(PYTHON), str(Path(__file__).resolve()), *arguments]


def train() -> tuple[list, int, str]:
    import keras
    import tensorflow as tf

    import distaccum

    distaccum.init()
    x, y, sample_weight = case.shard(distaccum.rank())
    model = keras.Sequential([keras.Input((case.FEATURES,)),
                              keras.layers.Dense(case.HIDDEN, activation="tanh"),
                              keras.layers.Dense(case.CLASSES)])
    model.set_weights(case.initial_weights())
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # default reduction
    model.compile(optimizer=keras.optimizers.SGD(case.LEARNING_RATE, momentum=case.MOMENTUM),
                  loss=loss)
    trainer = distaccum.Trainer.from_compiled(model, accumulation_steps=case.ACCUMULATION_STEPS)
    micro_batches = tf.data.Dataset.from_tensor_slices((x, y, sample_weight)).batch(case.MICRO_BATCH)
    trainer.fit(micro_batches, epochs=case.EPOCHS)
    return model.get_weights(), int(trainer.optimizer.iterations), loss.reduction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    weights, iterations, reduction = train()
    import distaccum

    if distaccum.rank() == 0:
        (args.out / "result.json").write_text(json.dumps({
            "system": "distaccum", "variant": "exact", "status": "ok", "error": "",
            "iterations": iterations, "weights": [w.tolist() for w in weights],
            "reduction": reduction,
            "note": "each worker its own shard; the epoch's last, partial window is an update"}))


if __name__ == "__main__":
    main()
