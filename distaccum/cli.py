"""`distaccum train --config FILE [--set key=value ...]`: argparse → config → the main job.

`distaccum k8s render (--config FILE | --command CMD ...) --workers N --gpus-per-worker G
--image IMG [--workdir DIR]` prints the Kubernetes manifests of that job (or writes a Kustomize
base with `--output-dir`), once the config is known to run on its N x slots ranks.

`distaccum launch COMMAND ...` runs a launcher (`mpirun ...`) so that a SIGTERM sent to it stops
the job with a checkpoint, as one sent to the ranks does (see `distaccum.launcher`).

`distaccum stop-ranks [--timeout S]` sends SIGTERM to every `distaccum train` process here and
waits until they have exited (a Kubernetes worker's preStop hook; see `distaccum.launcher`).

Bad input of any kind prints one line on stderr naming the key and the value, and exits 2.
Failures during training print one line and exit 1 (`DISTACCUM_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
from pathlib import Path

from distaccum import console
from distaccum.config import ConfigError, describe_keys, load_config

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
# 128 + SIGTERM, as if the signal had ended the process: launchers and Kubernetes see a
# failure (so a restart policy resumes the job), logs see why.
EXIT_INTERRUPTED = 143


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage text plus the error) and exit 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"distaccum: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="distaccum", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    train = commands.add_parser(
        "train",
        help="train as configured (run it under horovodrun or mpirun for several workers)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML file or --set key=value):\n" + describe_keys(),
    )
    train.add_argument("--config", help="YAML file of config keys (defaults apply otherwise)")
    train.add_argument("--workdir", help="run from this directory: its packages import (model:, "
                       "dataset:, loss: and metrics: import paths) and relative paths resolve "
                       "there")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key; repeatable",
    )
    _add_k8s_commands(commands)
    launch = commands.add_parser("launch", help="run a launcher (mpirun, horovodrun) so that a "
                                 "SIGTERM sent to it stops the job with a checkpoint")
    launch.add_argument("launch_command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                        help="the launcher's command line, e.g. mpirun -np 2 distaccum train ...")
    stop = commands.add_parser("stop-ranks", help="SIGTERM every `distaccum train` process here "
                               "and wait until they have exited (a worker pod's preStop hook)")
    stop.add_argument("--timeout", type=float, default=25.0,
                      help="seconds to wait at most (default 25)")
    return parser


def _add_k8s_commands(commands) -> None:
    k8s = commands.add_parser("k8s", help="Kubernetes (Kubeflow MPIJob) manifests")
    render = k8s.add_subparsers(dest="k8s_command", required=True, parser_class=_OneLineParser)
    options = render.add_parser("render", help="print manifests that `kubectl apply -f -` takes")
    options.add_argument("--config", help="YAML training config (validated), run by "
                         "`distaccum train` on every slot")
    options.add_argument("--workers", type=int, default=2, help="worker pods (default 2)")
    options.add_argument("--gpus-per-worker", type=int, default=0,
                         help="GPUs per worker pod; also its number of ranks (default 0)")
    options.add_argument("--cpu-slots-per-worker", type=int, default=1,
                         help="ranks per worker pod without GPUs (default 1)")
    options.add_argument("--memory-per-rank", help="memory request and limit of a worker pod, "
                         "per rank (default 2Gi, or 8Gi with GPUs)")
    options.add_argument("--image", help="container image (default distaccum:0.1.0, or "
                         "distaccum:0.1.0-gpu with GPUs; a GPU image's tag ends in -gpu)")
    options.add_argument("--api", choices=("mpijob", "trainjob"), default="mpijob",
                         help="mpijob: Kubeflow MPI Operator's MPIJob (default); trainjob: "
                         "Kubeflow Trainer v2's TrainJob and a ClusterTrainingRuntime")
    options.add_argument("--name", default="distaccum", help="job name (DNS label)")
    options.add_argument("--workdir", help="absolute directory of your project in the image: "
                         "ranks start there and `distaccum train` imports its packages")
    options.add_argument("--elastic", action="store_true",
                         help="train on as many worker pods as run (horovodrun's elastic mode): "
                         "workers may leave and join while the job trains, on the same "
                         "trajectory (needs global_batch_size and --api mpijob)")
    options.add_argument("--min-workers", type=int, help="with --elastic: the fewest worker "
                         "pods to train on (default 1)")
    options.add_argument("--max-workers", type=int, help="with --elastic: the most worker pods "
                         "to train on (default --workers)")
    options.add_argument("--output-dir", help="write a Kustomize base here instead of printing")
    options.add_argument("--command", dest="user_command", nargs=argparse.REMAINDER,
                         metavar="COMMAND ...",
                         help="instead of --config: your own command line, run on every slot "
                         "under mpirun (the rest of the line, e.g. --command python train.py)")


def _render_k8s(arguments) -> int:
    from distaccum import k8s, trainjob

    if bool(arguments.user_command) == bool(arguments.config):
        raise ConfigError("k8s render takes --config FILE or --command COMMAND ... (one of them). "
                          f"Received: --config={arguments.config!r}, "
                          f"--command={arguments.user_command!r}")
    if not arguments.elastic and (arguments.min_workers or arguments.max_workers):
        raise ConfigError(f"--min-workers and --max-workers are an elastic job's: add "
                          f"--elastic. Received: --min-workers={arguments.min_workers}, "
                          f"--max-workers={arguments.max_workers}")
    # A config that would fail in the cluster fails here.
    config = load_config(arguments.config) if arguments.config else None
    options = k8s.ClusterOptions(
        name=arguments.name,
        workers=arguments.workers,
        gpus_per_worker=arguments.gpus_per_worker,
        cpu_slots_per_worker=arguments.cpu_slots_per_worker,
        image=arguments.image,
        memory_per_rank=arguments.memory_per_rank,
        workdir=arguments.workdir,
        command=tuple(arguments.user_command or ()),
        min_workers=(arguments.min_workers or 1) if arguments.elastic else None,
        max_workers=arguments.max_workers if arguments.elastic else None,
    )
    if config is not None:
        k8s.check_ranks(options, config)
    renderer = trainjob.render if arguments.api == "trainjob" else k8s.render
    documents = renderer(options, Path(arguments.config).read_text() if arguments.config else None)
    if arguments.output_dir:
        k8s.write_kustomize_base(documents, arguments.output_dir)
    else:
        print(k8s.to_yaml(documents), end="")
    return 0


def _enter_workdir(workdir: str) -> None:
    """Make `workdir` the current directory and the first place imports look."""
    path = Path(workdir).resolve()
    if not path.is_dir():
        raise ConfigError(f"--workdir: not a directory. Received: --workdir={workdir!r}")
    os.chdir(path)
    sys.path.insert(0, str(path))


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "launch":
        from distaccum import launcher

        try:
            return launcher.run(arguments.launch_command)
        except ValueError as error:
            print(f"distaccum: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if arguments.command == "stop-ranks":
        from distaccum import launcher

        try:
            print(f"distaccum: {launcher.stop_ranks(arguments.timeout)}")
        except ValueError as error:
            print(f"distaccum: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0
    if arguments.command == "k8s":
        try:
            return _render_k8s(arguments)
        except ValueError as error:  # ConfigError and ManifestError both name key and value
            print(f"distaccum: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        if arguments.workdir:
            if arguments.config:  # named from where the command was typed
                arguments.config = os.path.abspath(arguments.config)
            _enter_workdir(arguments.workdir)
        config = load_config(arguments.config, arguments.overrides)
    except ConfigError as error:
        print(f"distaccum: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Before TensorFlow is imported: its later C++ info and warning lines are noise here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    console.import_tensorflow_quietly()
    from distaccum import comm, job
    from distaccum.errors import ModelDataMismatch, TrainingInterrupted

    try:
        job.run(config)
    except (ConfigError, ModelDataMismatch) as error:  # the model and the data do not fit: input
        print(f"distaccum: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingInterrupted as stop:
        if comm.is_chief():  # every worker stops at the same update; one of them says so
            print(f"distaccum: {stop}; checkpoint saved in {config.logdir}/checkpoints; run the "
                  "same command again to resume", file=sys.stderr)
        # Run as the program (argv from the command line), nothing follows in this process.
        return _interrupted(end_process=argv is None)
    except comm.WorkerLost as error:
        print(f"distaccum: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # one clear line instead of a traceback on every rank
        if os.environ.get("DISTACCUM_DEBUG"):
            raise
        print(f"distaccum: error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED
    return 0


def _interrupted(*, end_process: bool) -> int:
    """Exit code 143, once every worker is past the chief's checkpoint: a launcher ends the
    others as soon as one exits (mpirun with SIGKILL 0.5 s later), which would cut a save short.

    With `end_process` the process ends here: Python's own teardown (TensorFlow's objects, one by
    one) takes seconds of a preemption's notice, and everything worth keeping is on disk.
    """
    from distaccum import comm
    from distaccum.controller import STOP_SIGNALS

    if end_process:  # a second SIGTERM (horovodrun passes on its own) must not end this worker
        for signum in STOP_SIGNALS:  # while the chief may still be saving
            signal.signal(signum, signal.SIG_IGN)
    try:
        comm.barrier("the barrier after the stop's checkpoint")
    except comm.WorkerLost as error:
        print(f"distaccum: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if end_process:
        comm.shutdown()
        atexit._run_exitfuncs()  # what a normal exit would run first: Horovod's, TensorFlow's
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
