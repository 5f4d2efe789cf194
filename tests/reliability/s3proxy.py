"""A fault-injecting HTTP proxy between boto3 and the S3 test server (stdlib, one thread per connection).

Each request is matched against a list of `Fault` rules (first rule with uses left wins);
a matching rule answers in place of the server:

- `500`, `503`: an S3 error response (`InternalError`, `ServiceUnavailable`);
- `slowdown`: 503 with the `SlowDown` code (S3's throttling);
- `reset`: the connection is closed with a TCP reset before any response;
- `slow`: the request is held `delay_s`, then forwarded (past the client's read timeout,
  the client gives up and retries);
- `lost`: the request is forwarded (the server does the work) and then the connection is
  reset, so the client never sees the answer: the case of a write that succeeded but looks failed;
- `deny`: 403 `SignatureDoesNotMatch` echoing the request's auth headers back, as S3 does.

Every request is logged as (method, path with query, what happened).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "slowdown", "reset", "slow", "lost", "deny")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}
ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Fault:
    """Inject `kind` into the next `times` requests that match `method` and `path_contains`."""

    kind: str
    method: str | None = None
    path_contains: str | None = None
    times: int = 1
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; kinds are {KINDS}")

    def matches(self, method: str, path: str) -> bool:
        return (self.times > 0 and (self.method is None or self.method == method)
                and (self.path_contains is None or self.path_contains in path))


class FaultProxy:
    """Forward to `upstream` (http://host:port), injecting faults by rule or by a seeded storm."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.rules: list[Fault] = []
        self.storm: tuple[random.Random, float, tuple[str, ...], float] | None = None
        self.log: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.idle = threading.Condition(self.lock)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, *faults: Fault) -> None:
        with self.lock:
            self.rules.extend(faults)

    def start_storm(self, seed: int, rate: float, kinds: tuple[str, ...], delay_s: float = 0.0) -> None:
        """Give each request a fault with probability `rate`, drawn from `kinds` (seeded)."""
        with self.lock:
            self.storm = (random.Random(seed), rate, kinds, delay_s)

    def clear(self) -> None:
        with self.lock:
            self.rules, self.storm = [], None

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Wait until every request the proxy took has been answered or dropped (a `slow` one is
        forwarded after its delay, possibly after the client has moved on)."""
        with self.idle:
            if not self.idle.wait_for(lambda: self.in_flight == 0, timeout=timeout_s):
                raise TimeoutError(f"{self.in_flight} request(s) still held by the fault proxy after {timeout_s} s")

    def injected(self) -> list[tuple[str, str, str]]:
        return [entry for entry in self.log if entry[2] != "ok"]

    def pick(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.times -= 1
                    return rule
            if self.storm:
                rng, rate, kinds, delay_s = self.storm
                if rng.random() < rate:
                    return Fault(rng.choice(kinds), delay_s=delay_s)
        return None

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self):
                self.relay()

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

            def relay(self) -> None:
                body = self.read_body()
                fault = proxy.pick(self.command, self.path)
                outcome = fault.kind if fault else "ok"
                with proxy.lock:
                    proxy.log.append((self.command, self.path, outcome))
                    proxy.in_flight += 1
                try:
                    self.answer(fault, body)
                except OSError:  # the client gave up (its read timeout): nothing to answer
                    self.close_connection = True
                finally:
                    with proxy.idle:
                        proxy.in_flight -= 1
                        proxy.idle.notify_all()

            def answer(self, fault: Fault | None, body: bytes) -> None:
                if fault is None:
                    self.forward(body)
                elif fault.kind in ERRORS:
                    self.send_error_xml(*ERRORS[fault.kind])
                elif fault.kind == "reset":
                    self.reset()
                elif fault.kind == "slow":
                    time.sleep(fault.delay_s)
                    self.forward(body)
                elif fault.kind == "lost":
                    self.upstream_call(body)
                    self.reset()
                elif fault.kind == "deny":
                    echoed = "".join(f"<{name}>{self.headers.get(name, '')}</{name}>"
                                     for name in ("Authorization", "X-Amz-Security-Token"))
                    self.send_error_xml(403, "SignatureDoesNotMatch",
                                        "The request signature we calculated does not match.", echoed)

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def upstream_call(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    return response.status, response.getheaders(), data
                finally:
                    connection.close()

            def forward(self, body: bytes) -> None:
                status, headers, data = self.upstream_call(body)
                self.send_response(status)
                for name, value in headers:
                    lower = name.lower()
                    if lower in HOP_BY_HOP or (lower == "content-length" and self.command != "HEAD"):
                        continue
                    self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def send_error_xml(self, status: int, code: str, message: str, extra: str = "") -> None:
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message>{extra}<RequestId>fault</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def reset(self) -> None:
                """Close with RST (SO_LINGER 0): the client sees a connection reset, no response."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.connection.close()

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass

        return Handler
