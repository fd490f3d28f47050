"""`horovodrun --gloo ARGS` as the installed console script runs it (the same
`horovod.runner.launch.run_commandline`, so the same rendezvous, environment, process names,
signal handling and exit codes), without its check that Horovod was built with Gloo.

Why: horovodrun makes that check by importing `horovod.tensorflow` in a process of its own:
TensorFlow's import, ~6 s before any worker starts, in every launch of the test suite. The check
is of the installation, not of distaccum: a build without Gloo has no Gloo controller for the
workers' `hvd.init()` under the rendezvous horovodrun sets up, so the test that launched them
fails all the same (`launch/run.sh gloo`, in test_launchers, runs the real script).

    python horovodrun_gloo.py --gloo -np N COMMAND...
"""

import sys

from horovod.runner import launch


def main() -> int:
    if sys.argv[1:2] != ["--gloo"]:
        sys.exit("horovodrun_gloo.py: error: the first argument must be --gloo. "
                 f"Received: {sys.argv[1:2]}")
    launch.gloo_built = lambda verbose=False: True
    sys.argv[0] = "horovodrun"
    return launch.run_commandline()


if __name__ == "__main__":  # horovodrun's helpers start processes that import this file again
    sys.exit(main())
