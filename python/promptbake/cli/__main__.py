"""``python -m promptbake.cli``: the ``promptbake`` command."""

import sys

from promptbake.cli import main

sys.exit(main())
