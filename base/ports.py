"""Ports on 127.0.0.1: one a command was told to listen on, checked before anything starts, and
a free one for a server that must be told its port before it starts."""
from __future__ import annotations

import random
import socket
from pathlib import Path

from base.errors import UserError


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server that must be told its port before it starts
    (Ray's dashboard and exporters, SeaweedFS). Another process may still take it first; a server
    that can pick its own port and say which (Prometheus: monitoring/prometheus.py) should. It is
    drawn between Ray's worker ports (10002-19999) and the kernel's ephemeral range, from which the
    kernel numbers outgoing connections, so only another explicit bind can take it meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.sample(range(20000, low), min(low - 20000, 200)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 between 20000 and {low}")


def check_port_free(flag: str, port: int, host: str = "127.0.0.1") -> None:
    """A port a command will listen on: in range and free on `host`, checked before anything starts."""
    if not 1 <= port <= 65535:
        raise UserError(f"{flag}: got {port}, allowed: 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                            f"pick another port") from None
