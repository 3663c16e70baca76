"""Scorers: how a decision layer ranks the candidate visual tokens."""
