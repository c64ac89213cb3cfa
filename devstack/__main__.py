"""``python -m devstack``: the full ``dispatcher`` command, local stack included."""

from __future__ import annotations

import sys

from devstack.cli import main

sys.exit(main())
