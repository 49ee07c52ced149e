"""``python -m sdeflow.cli ...`` (and ``torchrun -m sdeflow.cli -- ...``): the `sdeflow` command."""

import sys

from . import main

sys.exit(main())
