"""``python -m mra_export``: the ``mra-export`` command without installing the package (with the
checkout on ``PYTHONPATH``, as on a lent GPU machine whose Python has torch but not this project)."""

import sys

from .cli import main

sys.exit(main())
