"""`distaccum train --config FILE [--set key=value ...]`: argparse → config → the main job.

Bad input of any kind prints one line on stderr naming the key and the value, and exits 2.
Failures during training print one line and exit 1 (`DISTACCUM_DEBUG=1` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from distaccum.config import ConfigError, describe_keys, load_config

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


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
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key; repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        config = load_config(arguments.config, arguments.overrides)
    except ConfigError as error:
        print(f"distaccum: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Before TensorFlow is imported: its later C++ info and warning lines are noise here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from distaccum import job

    try:
        job.run(config)
    except ConfigError as error:
        print(f"distaccum: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # one clear line instead of a traceback on every rank
        if os.environ.get("DISTACCUM_DEBUG"):
            raise
        print(f"distaccum: error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
