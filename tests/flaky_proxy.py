"""A loopback HTTP proxy in front of an S3 server that misbehaves like a throttled object store.

Of every request it answers a share with `503 SlowDown` (not forwarded), drops a share of
connections before forwarding (the request never arrives) and a share after forwarding (the
write landed, its reply is lost), and forwards the rest unchanged. Seeded: the same faults in
the same order of requests. Counts what it did in `stats`.
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message></Error>')


class FlakyProxy:
    def __init__(self, upstream_port: int, p_503: float = 0.10, p_drop: float = 0.03, p_drop_after: float = 0.02,
                 seed: int = 0):
        self.upstream_port, self.p = upstream_port, (p_503, p_drop, p_drop_after)
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.stats = {"requests": 0, "503": 0, "dropped": 0, "dropped_after": 0, "forwarded": 0}
        self.enabled = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive, as the SDKs expect

            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if n == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "503":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                if fault == "dropped":
                    return self._drop()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                up = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    up.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                               else None, headers=headers)
                    resp = up.getresponse()
                    data = resp.read()
                finally:
                    up.close()
                if fault == "dropped_after":
                    return self._drop()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD"
                                 else resp.getheader("Content-Length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self) -> str | None:
        with self.lock:
            self.stats["requests"] += 1
            if not self.enabled:
                self.stats["forwarded"] += 1
                return None
            x, (a, b, c) = self.rng.random(), self.p
            fault = "503" if x < a else "dropped" if x < a + b else "dropped_after" if x < a + b + c else None
            self.stats[fault or "forwarded"] += 1
            return fault

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
