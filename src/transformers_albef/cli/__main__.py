"""`python -m transformers_albef.cli ...` runs the `albef` command."""

import sys

from . import main

sys.exit(main())
