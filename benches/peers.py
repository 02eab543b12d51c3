"""Where the benchmarks find llama.cpp's own server, the peer every speed claim is a
ratio against (built by ../shared/tools/llama-cpp-peer.sh; never a dependency of zse)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

DEFAULT_LLAMA_SERVER = Path.home() / ".cache" / "zse-peer" / "bin" / "llama-server"


def llama_server_binary(explicit: str | None = None) -> str | None:
    """The binary named, else $ZSE_BENCH_LLAMA_SERVER, else the peer script's default
    location; None (and a line on stderr saying how to build it) when there is none."""
    path = explicit or os.environ.get("ZSE_BENCH_LLAMA_SERVER")
    if not path and DEFAULT_LLAMA_SERVER.exists():
        path = str(DEFAULT_LLAMA_SERVER)
    if not path:
        print("no llama-server (see ../shared/tools/llama-cpp-peer.sh)", file=sys.stderr)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
