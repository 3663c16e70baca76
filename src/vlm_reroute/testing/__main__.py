"""``python -m vlm_reroute.testing FAMILY FOLDER``: write one tiny random checkpoint with its processor."""

import sys

from .checkpoints import save_tiny_checkpoint
from .models import FAMILIES

if len(sys.argv) != 3 or sys.argv[1] not in FAMILIES:
    sys.exit(f"usage: python -m vlm_reroute.testing {{{','.join(FAMILIES)}}} FOLDER")
print(save_tiny_checkpoint(sys.argv[1], sys.argv[2]))
