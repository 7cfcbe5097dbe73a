"""`python -m unionfs` is the `unionfs` command."""

import sys

from .cli import main

sys.exit(main())
