"""Thin wrapper: ``python scripts/train_demo.py --out DIR ...`` is ``python -m vlm_reroute.demo.train``."""

from vlm_reroute.demo.train import parse, train

if __name__ == "__main__":
    train(parse())
