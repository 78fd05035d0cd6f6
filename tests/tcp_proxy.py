"""A loopback TCP proxy that can fail on demand, to put a dependency "down" without losing
its state (Apicurio in memory forgets every schema when restarted).

Modes: ``forward`` (pass bytes both ways), ``refuse`` (accept, then close at once: the
client sees the connection dropped), ``hang`` (accept, never answer: the client times
out). Switching away from ``forward`` also cuts the connections already open, so a client's
keep-alive pool cannot bypass the outage.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Literal, Self

Mode = Literal["forward", "refuse", "hang"]


class TcpProxy:
    """``127.0.0.1:<port>`` forwarding to ``target`` (host, port); see the module doc."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode: Mode = "forward"
        self.accepted = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def set_mode(self, mode: Mode) -> None:
        """Switch modes; leaving ``forward`` closes every open connection."""
        with self._lock:
            self.mode = mode
            if mode != "forward":
                self._cut_all()

    def _cut_all(self) -> None:
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self._open.clear()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                mode = self.mode
                if mode == "refuse":
                    client.close()
                    continue
                self._open.add(client)
            if mode == "hang":
                continue  # held open, never read: closed by set_mode() or close()
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                with self._lock:
                    self._open.discard(client)
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.add(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            # Shutting both ends down ends the other pump too; each pump closes its source.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)
            src.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            self._cut_all()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
