"""Whether distaccum's compiled steps run under XLA.

Two decisions, each in one place: `resolve_jit_compile` applies the user's `jit_compile` (Keras's
rule for `"auto"`, layers that say they cannot be compiled) when the `Trainer` is built, and
`compiles` asks XLA itself, at `prepare`, whether it can compile the model's micro-step, so that
a model with an op XLA has no kernel for trains without it after one warning instead of failing
on its first step.
"""

from __future__ import annotations

import re
import warnings

import keras
import tensorflow as tf

JIT_COMPILE = ("auto", True, False)


class XLAWarning(UserWarning):
    """XLA was asked for, and the model trains without it."""


def resolve_jit_compile(model: keras.Model, jit_compile) -> bool:
    """Whether the steps run under XLA. `"auto"` is Keras's rule for `compile(jit_compile=
    "auto")` under TensorFlow: on when a GPU is present, every layer supports XLA and op
    determinism is off (XLA has no deterministic form of some ops). `True` is overruled, with
    a warning naming them, only by layers that say they do not support XLA."""
    if not any(jit_compile is choice for choice in JIT_COMPILE):
        raise ValueError(f"jit_compile must be 'auto', True or False. Received: "
                         f"jit_compile={jit_compile!r}")
    if jit_compile is False:
        return False
    refusing = [layer.name for layer in model._flatten_layers() if not layer.supports_jit]
    if jit_compile == "auto":
        return (not refusing and bool(tf.config.list_physical_devices("GPU"))
                and not tf.config.is_op_determinism_enabled())
    if refusing:
        warnings.warn(XLAWarning(
            f"jit_compile=True: training without XLA, which layers {', '.join(refusing)} do not "
            "support (supports_jit=False)"), stacklevel=3)
        return False
    return True


def stand_in(micro_batch, micro_batch_size: int | None):
    """Zeros of the micro-batch's spec, its unknown sizes made known: what XLA compiles for."""
    def zeros(spec):
        if spec is None:
            return None
        shape = [micro_batch_size or 1] + [d if d is not None else 1 for d in spec.shape[1:]]
        return tf.zeros(shape, spec.dtype)

    return tf.nest.map_structure(zeros, micro_batch)


def compiles(step: tf.types.experimental.PolymorphicFunction, *arguments) -> bool:
    """Compile `step` on `arguments` for XLA, running nothing; whether XLA can. An op XLA has no
    kernel for (a `tf.numpy_function`, a string op) makes it False, with one warning naming it;
    any other error is left for the first step to raise, where it names the micro-batch."""
    try:
        step.experimental_get_compiler_ir(*arguments)(stage="hlo")
    except (ValueError, tf.errors.OpError) as error:
        message = str(error)
        if "XLA" not in message:
            return True
        # "... on XLA_CPU_JIT: PyFunc (No registered 'PyFunc' OpKernel ... {{node a/b/PyFunc}}"
        unsupported = re.search(r"on XLA_\w+: (\w+) \(.*?\{\{node ([^}]+)\}\}", message)
        reason = (f"it has no kernel for op {unsupported[1]} (in {unsupported[2]})"
                  if unsupported else next(line.strip() for line in message.splitlines()
                                           if "XLA" in line)[:300])
        warnings.warn(XLAWarning(f"jit_compile: training without XLA, which cannot compile "
                                 f"this model: {reason}"), stacklevel=5)
        return False
    return True
