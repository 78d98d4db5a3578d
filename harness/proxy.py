"""A TCP forwarder on loopback that a test can cut and restore: a network partition between
one process and one server (PostgreSQL, say), without stopping the server for everyone. The
server may listen on TCP or on a Unix socket (the embedded PostgreSQL)."""

import contextlib
import socket
import threading

from harness.processes import free_port


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`, a (host, port) or a Unix socket's path. `cut()`
    drops every connection and refuses new ones (the address stops listening); `restore()`
    listens again on the same port."""

    def __init__(self, target: tuple[str, int] | str):
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            for conn in self._open:
                _close(conn)
            self._open.clear()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = _connect(self.target)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # cut, or the other side closed
        finally:
            with self._lock:
                self._open -= {source, sink}
            _close(source)
            _close(sink)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


def _connect(target: tuple[str, int] | str) -> socket.socket:
    if isinstance(target, str):
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.settimeout(5)
        try:
            upstream.connect(target)
        except OSError:
            upstream.close()
            raise
        return upstream
    return socket.create_connection(target, timeout=5)
