"""The `keras-ibprune` command line: `demo`, `prune`, `export`, `summary` and `bench`.

One module per command (`NAME`, `HELP`, `EPILOG`, `configure(parser)`, `run(args)`); shared
helpers in `_common`. This package imports neither Keras nor TensorFlow until a command
runs, so `--help` and argument errors answer at once. While a command runs, the native
log lines TensorFlow and its converter write to the process's stderr (C++ logging,
`cuInit`, converter settings) are dropped; `--verbose` keeps them. The library itself
never touches the environment or file descriptors.

Data files are `.npz` archives holding an `x` array (model inputs, batch first) and a `y`
array (labels: class ids, one-hot rows or regression targets), e.g. written with
`np.savez("held_out.npz", x=x_val, y=y_val)`.

    keras-ibprune demo
    keras-ibprune prune model.keras --data held_out.npz --sparsity 0.9 --out pruned.keras
    keras-ibprune export pruned.keras pruned.tflite --quantize int8 --data held_out.npz
    keras-ibprune summary pruned.keras
    keras-ibprune bench

User errors (a missing file, a missing `.npz` key, data of the wrong shape) print one
`keras-ibprune COMMAND: error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from keras_ibprune_cli import bench, demo, export, prune, summary
from keras_ibprune_cli._common import CLIError, load_npz

COMMANDS = {m.NAME: m for m in (demo, prune, export, summary, bench)}

__all__ = ["COMMANDS", "CLIError", "build_parser", "load_npz", "main"]


def build_parser():
    """The argparse parser of `keras-ibprune` (one sub-parser per command module)."""
    parser = argparse.ArgumentParser(
        prog="keras-ibprune",
        description="Information-bottleneck pruning for Keras 3.",
        epilog="Run `keras-ibprune COMMAND --help` for the flags of a command.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="keep TensorFlow's native log lines on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           epilog=module.EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


@contextlib.contextmanager
def _native_stderr_dropped():
    """Points file descriptor 2 at /dev/null; Python's `sys.stderr` keeps the terminal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded, captured)
        yield
        return
    python_stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr.close()
        sys.stderr = python_stderr
        os.close(saved)
        os.close(devnull)


def main(argv=None):
    """Entry point of the `keras-ibprune` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # this process only: the CLI's own
    quiet = not args.verbose and argv is None  # in-process calls (tests) keep their stderr
    try:
        with _native_stderr_dropped() if quiet else contextlib.nullcontext():
            return args._run(args)
    except CLIError as err:
        print(f"keras-ibprune {args.command}: error: {err}", file=sys.stderr)
        return err.status
