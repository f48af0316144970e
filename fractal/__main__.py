"""`python -m fractal ...`: the same as the `fractal` console script."""
import sys

from .cli import main

sys.exit(main())
