"""``python -m promptbake``: the ``promptbake`` command (and ``torchrun ... -m promptbake bake``)."""

import sys

from promptbake.cli import main

sys.exit(main())
