"""`make gpu-check`: the CUDA path in one prepared check (see `cbam.bench.gpu_check`).

Run from the repository, with the machine's own python and torch (our package need not be
installed): `PYTHONPATH=src python3 scripts/gpu_check.py --output DIR [--dry-run]`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cbam.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
