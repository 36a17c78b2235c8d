"""`python -m pixelllm.bench`."""

import sys

from pixelllm.bench.run import main

try:
    raise SystemExit(main())
except KeyboardInterrupt:  # Ctrl+C or SIGTERM: its temporary folder is removed, its children stopped
    print("interrupted: the bench stopped (a --json report keeps the measurements finished before)", file=sys.stderr)
    raise SystemExit(130) from None
