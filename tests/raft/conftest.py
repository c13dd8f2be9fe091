"""Make ``import harness`` work for the scenario tests in this directory.

tests/raft has no __init__.py (plain test files); put the directory itself on sys.path so
the shared harness module is importable from every test file here.
"""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
