"""sd_notify in a few lines of stdlib: tell systemd (``Type=notify``) where we are.

``READY=1`` once the listener is bound and Redis answered, ``RELOADING=1``
and ``READY=1`` around a reload, ``STOPPING=1`` when shutdown begins.
Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"`` ...) to systemd; False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def reloading() -> bool:
    """Tell systemd a reload started (it wants the monotonic time too)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
