"""`python -m runtime.cli ...` is the `speed` command."""

import sys

from runtime.cli.main import main

sys.exit(main())
