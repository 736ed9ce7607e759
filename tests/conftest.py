import os
import sys

# Test helpers (e.g. the distributed sweep's worker) import each other by module name.
sys.path.insert(0, os.path.dirname(__file__))
