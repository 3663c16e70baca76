"""``python -m vlm_reroute.eval ARGS``: lmms-eval, with a failed run made exit status 1 (:mod:`.launch`)."""

import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
