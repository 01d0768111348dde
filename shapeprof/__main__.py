"""`python -m shapeprof ...`: the same command line as the `shapeprof` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
