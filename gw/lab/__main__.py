"""``python -m gw.lab``: the lab's own program (see `gw.lab.namespaces`)."""

import sys

from .namespaces import main

if __name__ == "__main__":
    sys.exit(main())
