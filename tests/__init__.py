"""The test suite. This runs before conftest.py and every test module is imported (they are this package's modules)."""

import os
import sys

# Cache bytecode even where the machine says not to (PYTHONDONTWRITEBYTECODE=1 on these machines): the suite starts
# ~150 Python processes that import nst/, flows/ and the tests, and each compiled them from source again. Collecting
# the suite: 13.2 -> 9.1 s a test process (farm-bench, median of 5). __pycache__ is in .gitignore.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
