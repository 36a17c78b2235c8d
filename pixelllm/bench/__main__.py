"""`python -m pixelllm.bench`."""

from pixelllm.bench.run import main

raise SystemExit(main())
