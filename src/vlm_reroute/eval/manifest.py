"""The ``lmms_eval.models`` entry point: registers the model id ``vlm_reroute``.

lmms-eval imports this module every time it lists its models, so it imports neither torch nor
transformers; the model classes (:mod:`.model`) are imported only when ``vlm_reroute`` is used.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "vlm_reroute"
CHAT_CLASS = "vlm_reroute.eval.model.VlmReroute"
SIMPLE_CLASS = "vlm_reroute.eval.model.VlmRerouteSimple"


def lmms_manifests() -> list[Any]:
    """The manifest lmms-eval's registry loads (chat class by default, simple with ``--force_simple``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS, simple_class_path=SIMPLE_CLASS)]
