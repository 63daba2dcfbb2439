"""Train, log, register and (if it wins) promote the fraud model. See --help."""

import sys

from predictor.training import main

if __name__ == "__main__":
    sys.exit(main())
