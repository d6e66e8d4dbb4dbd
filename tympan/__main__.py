"""``python -m tympan`` (and ``torchrun -m tympan train ...``) runs the command line."""

import sys

from tympan.cli import main

sys.exit(main())
