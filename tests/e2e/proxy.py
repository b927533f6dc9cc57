"""A frame-aware TCP proxy for fault injection between a Kafka client and a broker.

Forwards length-prefixed frames both ways. With `drop_first_produce_response=True`, the first
Produce request (api key 0) seen on any connection is forwarded to the broker, the proxy waits for
the broker's response to it, drops that response and closes both sides: the broker has written the
batch but the client never learns it, so an idempotent producer must resend the same batch.
"""
from __future__ import annotations

import socket
import struct
import threading


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            b = s.recv(n - len(buf))
        except OSError:
            return None
        if not b:
            return None
        buf += b
    return bytes(buf)


def _recv_frame(s: socket.socket) -> bytes | None:
    hdr = _recv_exact(s, 4)
    if hdr is None:
        return None
    (n,) = struct.unpack(">i", hdr)
    if n < 0 or n > 200 << 20:
        return None
    body = _recv_exact(s, n)
    return None if body is None else hdr + body


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], drop_first_produce_response: bool = True):
        self.upstream = upstream
        self.drop = drop_first_produce_response
        self.lock = threading.Lock()
        self.produce_requests = 0
        self.dropped: list[int] = []        # correlation ids whose responses were dropped
        self.armed = drop_first_produce_response
        self.connections = 0
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.stopped = False
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self):
        self.stopped = True
        for s in [self.lsock, *self.socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept_loop(self):
        while not self.stopped:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=10)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.connections += 1
                self.socks += [c, u]
            state = {"drop_corr": None}
            threading.Thread(target=self._c2u, args=(c, u, state), daemon=True).start()
            threading.Thread(target=self._u2c, args=(c, u, state), daemon=True).start()

    @staticmethod
    def _kill(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _c2u(self, c, u, state):
        while True:
            f = _recv_frame(c)
            if f is None:
                self._kill(c, u)
                return
            api_key, _ver, corr = struct.unpack_from(">hhi", f, 4)
            if api_key == 0:
                with self.lock:
                    self.produce_requests += 1
                    if self.armed:
                        self.armed = False
                        state["drop_corr"] = corr
            try:
                u.sendall(f)
            except OSError:
                self._kill(c, u)
                return

    def _u2c(self, c, u, state):
        while True:
            f = _recv_frame(u)
            if f is None:
                self._kill(c, u)
                return
            (corr,) = struct.unpack_from(">i", f, 4)
            if state["drop_corr"] is not None and corr == state["drop_corr"]:
                with self.lock:
                    self.dropped.append(corr)
                self._kill(c, u)  # the broker has answered (so it wrote the batch); the client never hears
                return
            try:
                c.sendall(f)
            except OSError:
                self._kill(c, u)
                return
