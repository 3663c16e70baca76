"""Network helpers for tests that talk to themselves over loopback.

``urllib`` (and ``huggingface_hub``'s endpoint check) follow the ``*_proxy`` environment variables:
behind a proxy a request to ``127.0.0.1`` would go to the proxy, which cannot reach the test's own
server. Tests that serve or dial loopback call :func:`clear_proxies` first.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

PROXY_VARIABLES = tuple(
    name for base in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy") for name in (base, base.upper())
)


def clear_proxies(monkeypatch) -> None:
    """Remove every proxy variable and bypass proxies for all hosts, for this test only."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses every connection while the block lasts: bound, never listening,
    so no other process can listen there meanwhile (a fixed port such as 9 may have a listener)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]
