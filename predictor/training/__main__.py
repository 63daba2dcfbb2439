import sys

from predictor.training.cli import main

sys.exit(main())
