"""``python -m lakeproxy``: the same as the ``lakeproxy`` console script."""

import sys

from lakeproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
