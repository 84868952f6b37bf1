"""``python -m quackae`` runs the ``quackae`` console script."""

from __future__ import annotations

import sys

from quackae.cli.command import main

sys.exit(main())
