"""``python -m dgex``: the ``dgex`` command line (:func:`dgex.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
