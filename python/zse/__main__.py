"""``python -m zse``: the same as the ``zse`` command."""

import sys

from .cli import main

sys.exit(main())
