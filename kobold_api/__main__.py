"""``python -m kobold_api`` is the ``kobold-api`` command."""

import sys

from .cli import main

sys.exit(main())
