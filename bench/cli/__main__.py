"""`python -m bench.cli ...` is `alure-bench ...`."""
import sys

from bench.cli import main

sys.exit(main())
