"""Shared by the command-line, pipeline and loading tests: tiny checkpoints saved once per session,
small images, and a runner that checks the one-line error contract."""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_reroute.cli import app
from vlm_reroute.testing.checkpoints import save_tiny_checkpoint

runner = CliRunner()

#: how long a test waits for a child Python process: a guard against a hang, never a speed bound (a
#: loaded 2-core machine imports torch, transformers and lmms-eval once per process)
SUBPROCESS_TIMEOUT_S = 1200


def invoke(*args: str, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def assert_one_line_error(result, *fragments: str) -> str:
    """Status 1, exactly one ``error: ...`` line on stderr naming ``fragments``, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@cache
def _checkpoint(root: Path, family: str) -> Path:
    return save_tiny_checkpoint(family, root / family)


def saved_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny LLaVA and Qwen2-VL checkpoints with processors, written once per session (test modules
    wrap this in a fixture)."""
    root = tmp_path_factory.getbasetemp() / "cli-checkpoints"
    return {family: _checkpoint(root, family) for family in ("llava", "qwen2_vl")}


def saved_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 500x400 and a 300x200 image (Qwen gives them different token counts)."""
    root = tmp_path_factory.getbasetemp() / "cli-images"
    root.mkdir(exist_ok=True)
    out = {}
    for name, size, color in (("big", (500, 400), (200, 40, 40)), ("small", (300, 200), (40, 90, 200))):
        out[name] = root / f"{name}.png"
        if not out[name].exists():
            Image.new("RGB", size, color).save(out[name])
    return out


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (no pixel data): what a huge image
    looks like to ``Image.open`` before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on a free local port; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
