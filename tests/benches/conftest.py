"""bench/ is a folder of scripts at the repository root, not an installed package: the
bench tests import it from there (``python -m bench.X`` finds it the same way)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
