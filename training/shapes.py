"""Command line for the Shapes world generator (DESIGN §3); the library is :mod:`training.data.shapes`.

    python -m training.shapes --out DIR --split NAME --num N --seed S [--size 256]
        [--world standard|shift] [--holdout-only]
"""

import sys

from training.data.shapes import main

if __name__ == "__main__":
    sys.exit(main())
