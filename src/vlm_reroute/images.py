"""Images a person names (a PIL image, a path, an http(s) URL), fully decoded to RGB.

Every problem a person can fix (a missing file, a folder, a download that fails, a file PIL cannot
decode or that is too large to decode safely) raises :class:`~vlm_reroute.loading.LoadError` with
one line naming the image and what to do.
"""

from __future__ import annotations

import io
import os
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

from .loading import LoadError, _first_line

ImageLike = str | os.PathLike | Image.Image


def load_image(source: ImageLike) -> Image.Image:
    """An RGB image from a PIL image, a local path or an http(s) URL, fully decoded."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=20) as response:
                data = response.read()
        except (OSError, ValueError) as exc:
            raise LoadError(
                f"cannot download image {text!r} ({_first_line(exc)}); pass a local file"
            ) from exc
        return _decode(io.BytesIO(data), text)
    path = Path(text).expanduser()
    if path.is_dir():
        raise LoadError(f"image {text!r} is a folder; give an image file (PNG, JPEG, ...)")
    if not path.is_file():
        raise LoadError(f"image file not found: {text}")
    return _decode(path, text)


def _decode(file: Any, name: str) -> Image.Image:
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise LoadError(
            f"image {name!r} is too large to decode safely ({_first_line(exc).split(': ', 1)[-1]}); "
            "downscale it first"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise LoadError(f"{name!r} is not an image PIL can read (PNG, JPEG, WebP, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise LoadError(f"cannot decode image {name!r} ({_first_line(exc)}); is the file complete?") from exc
