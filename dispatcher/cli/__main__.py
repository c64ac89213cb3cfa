"""``python -m dispatcher.cli``."""

from __future__ import annotations

import sys

from dispatcher.cli.main import main

sys.exit(main())
