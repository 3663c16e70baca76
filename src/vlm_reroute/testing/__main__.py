"""``python -m vlm_reroute.testing FAMILY FOLDER``: write one tiny random checkpoint with its processor.

``FAMILY`` is any family of :data:`vlm_reroute.families.FAMILIES` (``llava`` ... ``smolvlm``).
"""

import sys

from ..families import family_names
from .checkpoints import save_tiny_checkpoint

if len(sys.argv) != 3 or sys.argv[1] not in family_names():
    sys.exit(f"usage: python -m vlm_reroute.testing {{{','.join(family_names())}}} FOLDER")
print(save_tiny_checkpoint(sys.argv[1], sys.argv[2]))
