"""``python -m composer_numa.cli``: the ``composer-numa`` command (how ``launch`` starts each rank)."""

import sys

from composer_numa.cli import main

sys.exit(main())
