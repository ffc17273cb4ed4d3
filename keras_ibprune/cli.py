"""The `keras-ibprune` command line lives in the light package `keras_ibprune_cli`.

It imports neither Keras nor TensorFlow before a command runs (so `--help` is instant);
this module re-exports its entry points for code that imported them from here.
"""

from keras_ibprune_cli import COMMANDS, CLIError, build_parser, load_npz, main
from keras_ibprune_cli._common import demo_model, digits

__all__ = ["COMMANDS", "CLIError", "build_parser", "demo_model", "digits", "load_npz", "main"]

if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
