"""Measured cost: interleaved timing, the zero-overhead ideal router, memory and plots."""
