"""`python -m keras_ibprune_cli` runs the `keras-ibprune` command."""

import sys

from keras_ibprune_cli import main

sys.exit(main())
