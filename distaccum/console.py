"""What reaches the console from TensorFlow's C++ side: its known noise dropped, the rest kept.

TensorFlow 2.21 prints load-time banners through absl before any log level applies, and a CUDA
build prints an ERROR line when it probes for GPUs on a machine that has none (`failed call to
cuInit`), although it then runs on the CPU as intended. Both go to file descriptor 2 from C++,
past `sys.stderr`. `dropping` captures that descriptor around a call and passes every other line
on, in order, so real errors still come through whole.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Sequence

# Printed by TensorFlow 2.21 through absl while it loads, before any log level applies.
LOAD_BANNERS = ("All log messages before absl::InitializeLog() is called",
                "oneDNN custom operations are on")
# A CUDA build's GPU probe on a machine without a usable GPU; the start-up block says instead
# that the rank trains on its CPU (see `devices`).
NO_GPU = ("failed call to cuInit",)


@contextlib.contextmanager
def dropping(noise: Sequence[str]) -> Iterator[None]:
    """Run the body with file descriptor 2 captured; then write to stderr every captured line
    that contains none of `noise`."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(text in line for text in noise):
                    sys.stderr.write(line)
            sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Import TensorFlow without its load-time banners (on every rank)."""
    if "tensorflow" in sys.modules:
        return
    with dropping(LOAD_BANNERS):
        import tensorflow  # noqa: F401
