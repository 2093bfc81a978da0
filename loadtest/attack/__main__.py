"""`python -m loadtest.attack`: mnist-attack."""

import sys

from loadtest.attack import main

if __name__ == "__main__":
    sys.exit(main())
