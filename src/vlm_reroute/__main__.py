"""``python -m vlm_reroute``: the same command line as ``vlm-reroute``."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="vlm-reroute")
