"""``python -m ptfast.demo``: see :mod:`ptfast.demo`."""

import sys

from ptfast.demo import main

sys.exit(main())
