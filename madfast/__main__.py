"""`python -m madfast …` (what torchrun runs: `torchrun --nproc_per_node N -m madfast distill …`)."""

import sys

from madfast.cli import main

sys.exit(main())
