"""``python -m jaxnoise``: the same as the ``jaxnoise`` console script."""

import sys

from jaxnoise.cli import main

sys.exit(main())
