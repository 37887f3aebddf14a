"""Ports for servers that a test starts in another process (``kobold-api serve``, HAProxy).

Such a port is picked here and bound there later. Picking it with ``bind(0)`` draws it from
Linux's ephemeral range (32768-60999), the range every port-0 server and every outgoing
connection on the machine draws from too, so another test could take it in between, or worse
answer on it. These are picked below that range, at random; a start that still fails with
"Address already in use" is retried on other ports by the caller (see ``PORT_IN_USE``).
"""

from __future__ import annotations

import random
import socket

#: Below the ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``: 32768 and up).
PORT_RANGE = (20000, 32000)
#: What a server that lost its port to someone else says (waitress's OSError, HAProxy's alert).
PORT_IN_USE = "Address already in use"
_rng = random.Random()


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive loopback ports that are free now."""
    for _ in range(200):
        base = _rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - count)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} free ports in a row in {PORT_RANGE}")
