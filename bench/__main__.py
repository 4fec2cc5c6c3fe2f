"""`python -m bench` (`make bench`): the system benchmark, see bench/system.py."""

import sys

from bench.system import main

sys.exit(main())
