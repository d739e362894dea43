"""`python -m lstmwatch`: the same as the `lstmwatch` command."""

import sys

from .cli import main

sys.exit(main())
