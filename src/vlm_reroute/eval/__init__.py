"""Evaluation through lmms-eval: the ``vlm_reroute`` model plugin, per-family RefCOCO tasks, the grid runner.

Importing this package (and :mod:`.manifest`, :mod:`.spec`, :mod:`.parsers`, :mod:`.metrics`) imports
neither torch nor transformers: lmms-eval imports the manifest every time it lists its models.
"""
