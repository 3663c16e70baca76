#!/usr/bin/env bash
# lmms-eval (the `eval` extra) requires torchvision. Beside a CPU-only torch, the registry's torchvision
# build does not load ("operator torchvision::nms does not exist"), and transformers then fails to
# import every image processor. Remove torchvision when it cannot be imported: transformers falls back
# to its PIL image processors, which is all vlm-reroute and lmms-eval's image tasks need.
# On a GPU machine with a matching torch/torchvision pair this does nothing.
set -euo pipefail
if python -c "import torchvision" >/dev/null 2>&1; then
  exit 0
fi
echo "torchvision does not import with this torch; uninstalling it (transformers uses its PIL image processors)"
python -m pip uninstall -y torchvision
python -c "import transformers; transformers.CLIPImageProcessor; transformers.Qwen2VLImageProcessor"
