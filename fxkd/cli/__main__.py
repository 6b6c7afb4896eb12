"""``python -m fxkd.cli``: the ``fxkd`` command."""

import sys

from fxkd.cli.main import main

sys.exit(main())
