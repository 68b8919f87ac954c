"""A slow link on 127.0.0.1: a TCP proxy in front of the S3 server that lets bytes through
at a set rate in each direction (shared by every connection, as one uplink and one
downlink are) and delivers each of them half a round trip after it left.

Why: on loopback the network is free, so a delta store shows only its CPU cost; its
users upload over real links, where sending a fraction of the bytes is the point. Every
system in the bandwidth-limited run talks to S3 through one of these.

Model: each direction is a queue with one server. A chunk read from the sender at time
t starts leaving at max(t, when the link is free) and takes ``len / rate`` seconds; it
arrives ``rtt / 2`` after it has left. A connection buffers at most ``BUFFER`` bytes per
direction (about a bandwidth-delay product), so a fast sender is held back by TCP, as a
router with a short queue would do. Connection set-up is local (not delayed).
"""
from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Any

CHUNK = 16 << 10
#: chunks a direction of one connection may hold in flight (32 × 16 KiB = 512 KiB)
BUFFER = 32


class Link:
    """One direction of the link, shared by every connection."""

    def __init__(self, bytes_per_s: float, delay: float) -> None:
        self.rate = bytes_per_s
        self.delay = delay
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.bytes = 0

    def due(self, n: int) -> float:
        """When ``n`` bytes read now arrive at the other end (monotonic time)."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + n / self.rate
            self.bytes += n
            return self._free_at + self.delay


class Throttle:
    """``with Throttle(upstream_port, mbit=100, rtt_ms=20) as t: t.url``"""

    def __init__(self, upstream_port: int, mbit: float = 100.0, rtt_ms: float = 20.0,
                 upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mbit, self.rtt_ms = mbit, rtt_ms
        rate = mbit * 1e6 / 8
        self.up = Link(rate, rtt_ms / 2000)     # client -> server
        self.down = Link(rate, rtt_ms / 2000)   # server -> client
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="throttle")

    def __enter__(self) -> "Throttle":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass

    def describe(self) -> dict[str, Any]:
        return {"mbit": self.mbit, "rtt_ms": self.rtt_ms, "connections": self.connections,
                "bytes_up": self.up.bytes, "bytes_down": self.down.bytes}

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self.connections += 1
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = {"open": 2}
            lock = threading.Lock()

            def done(a: socket.socket = client, b: socket.socket = server) -> None:
                with lock:
                    state["open"] -= 1
                    last = state["open"] == 0
                if last:
                    for s in (a, b):
                        try:
                            s.close()
                        except OSError:
                            pass

            self._pipe(client, server, self.up, done)
            self._pipe(server, client, self.down, done)

    def _pipe(self, src: socket.socket, dst: socket.socket, link: Link,
              done: Any) -> None:
        q: queue.Queue[tuple[float, bytes] | None] = queue.Queue(maxsize=BUFFER)

        def read() -> None:
            try:
                while True:
                    data = src.recv(CHUNK)
                    if not data:
                        break
                    q.put((link.due(len(data)), data))
            except OSError:
                pass
            q.put(None)

        def write() -> None:
            try:
                while (item := q.get()) is not None:
                    due, data = item
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                # the other side is gone: stop reading too
                try:
                    src.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
                while q.get() is not None:
                    pass
            done()

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()
