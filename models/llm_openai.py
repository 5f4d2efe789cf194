"""The `openai` engine: any OpenAI-compatible `/v1/chat/completions` endpoint (`vllm serve`,
a Ray Serve LLM deployment, a hosted API), over the standard library's HTTP client.

- Up to `max_concurrency` requests in flight (a thread pool), each with `request_timeout_s`.
- Retries with exponential backoff on 429, 5xx, timeouts, connection errors and broken HTTP
  (honouring a numeric `Retry-After`); other 4xx answers fail that prompt alone, without retry.
  A call whose every request failed that way, or met 401, 403 or 404 (a wrong key, model or
  address), raises `EngineUnavailable`: the unit fails, rather than rejecting every sample.
- `request_timeout_s` bounds the whole request (a server dripping its answer is cut off), and a
  body larger than any answer of `max_new_tokens` is refused unread.
- The API key is read from the environment variable named by `api_key_env` and sent only in
  the `Authorization` header, only to `endpoint_url`: never logged, never put into an error, never
  sent on to where a redirect points (a redirect fails that prompt, naming the status).
- The JSON schema goes into the field named by `structured_output`: OpenAI's
  `response_format: {"type": "json_schema", ...}` (also understood by vLLM's server), vLLM's
  `structured_outputs: {"json": ...}` (vLLM >= 0.12) or `guided_json` (older vLLM).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from models.llm import BatchEngine, Conversation, EngineError, EngineUnavailable, sampling_settings

if TYPE_CHECKING:
    from factory.framework.config import DialogueConfig

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0
READ_CHUNK_BYTES = 64 * 1024
ENVELOPE_BYTES = 64 * 1024  # the answer's envelope (id, usage, ...) around its text
BYTES_PER_TOKEN = 128  # a long token (~20 chars) with every char JSON-escaped (\uXXXX, 6 bytes)


class TransientError(EngineError):
    """Worth retrying: the server was busy, slow, or unreachable."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestRefused(EngineError):
    """The server refused this request (4xx): retrying the same request will not help."""


class EndpointRefused(RequestRefused):
    """401, 403 or 404: the key, the model or the address is wrong, for every request alike."""


class OpenAIEngine(BatchEngine):
    name = "openai"

    def __init__(self, config: DialogueConfig):
        if not config.endpoint_url:
            raise EngineError("engine 'openai' needs dialogue.endpoint_url")
        self.config = config
        self.url = config.endpoint_url.rstrip("/") + "/chat/completions"
        self.safe_url = redact_url(self.url)
        self.max_body_bytes = ENVELOPE_BYTES + BYTES_PER_TOKEN * config.max_new_tokens
        self._api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not self._api_key:
            log.info("no API key in $%s; sending requests without one", config.api_key_env)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "model": self.config.model, "endpoint": self.safe_url,
                **sampling_settings(self.config)}

    def _generate(
        self, conversations: list[Conversation], seeds: list[int], json_schema: dict[str, Any] | None
    ) -> list[str | None]:
        bodies = [self.request_body(chat, seed, json_schema) for chat, seed in zip(conversations, seeds)]
        workers = min(self.config.max_concurrency, len(bodies))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm-http") as pool:
            results = list(pool.map(self._complete_or_error, bodies))
        if all(isinstance(result, (TransientError, EndpointRefused)) for result in results):
            raise EngineUnavailable(f"{self.safe_url}: every request failed; last: {results[-1]}")
        return [None if isinstance(result, EngineError) else result for result in results]

    def request_body(self, conversation: Conversation, seed: int, json_schema: dict[str, Any] | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": conversation,
            "temperature": self.config.temperature,
            "top_p": self.config.top_p,
            "max_tokens": self.config.max_new_tokens,
            "seed": seed,
        }
        if json_schema is not None:
            body.update(structured_output_fields(self.config.structured_output, json_schema))
        return body

    # --- one request, with retries -------------------------------------------------------

    def _complete_or_error(self, body: dict[str, Any]) -> str | EngineError:
        try:
            return self._complete(body)
        except EngineError as err:
            log.warning("LLM request to %s failed: %s", self.safe_url, err)
            return err

    def _complete(self, body: dict[str, Any]) -> str:
        payload = json.dumps(body).encode("utf-8")
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._post(payload)
            except TransientError as err:
                if attempt == self.config.max_retries:
                    raise
                delay = err.retry_after if err.retry_after is not None else self._backoff(attempt)
                log.info("LLM request to %s: %s; retry %d in %.2fs", self.safe_url, err, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF_S, self.config.retry_backoff_s * 2**attempt) * random.uniform(0.8, 1.2)

    def _post(self, payload: bytes) -> str:
        request = urllib.request.Request(self.url, data=payload, method="POST", headers=self._headers())
        request.watchdog = watchdog = Watchdog(self.config.request_timeout_s)
        try:
            with OPENER.open(request, timeout=self.config.request_timeout_s) as response:
                raw = self._read_body(response)
        except urllib.error.HTTPError as err:
            raise http_failure(err) from None
        except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise watchdog.failure(err) from None
        finally:
            watchdog.cancel()
        if watchdog.fired:  # a cut connection can read as an answer that ended early
            raise watchdog.failure()
        return completion_text(raw)

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        """The whole body, unless it outgrows `max_body_bytes`."""
        body = bytearray()
        while chunk := response.read1(READ_CHUNK_BYTES):
            body += chunk
            if len(body) > self.max_body_bytes:
                raise TransientError(f"answer larger than {self.max_body_bytes} bytes")
        if response.length:  # read1 ends quietly where a server closes short of its Content-Length
            raise http.client.IncompleteRead(bytes(body), response.length)
        return bytes(body)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers


class RefuseRedirect(urllib.request.HTTPRedirectHandler):
    """urllib follows a 301/302/303 to a POST as a GET to the new address, with the Authorization
    header: here a redirect stays the HTTP error it is."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Watchdog:
    """Cuts a request's connection at its deadline. A socket timeout bounds each read alone, so a
    server dripping its headers or its body a byte at a time would hold the request for ever."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.fired = False
        self._timer: threading.Timer | None = None

    def arm(self, sock: socket.socket) -> None:
        self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._cut, (sock,))
        self._timer.daemon = True
        self._timer.start()

    def _cut(self, sock: socket.socket) -> None:
        self.fired = True
        with contextlib.suppress(OSError):  # closed already
            sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def failure(self, err: Exception | None = None) -> TransientError:
        """What a failed request says: cut at the deadline, timed out, or why it broke."""
        if self.fired or isinstance(err, TimeoutError):
            return TransientError(f"no whole answer within {self.timeout_s}s")
        if isinstance(err, http.client.HTTPException):  # cut-short body, not HTTP at all, ...
            return TransientError(f"broken HTTP answer: {type(err).__name__}")
        reason = getattr(err, "reason", err)
        return TransientError(f"connection failed: {type(reason).__name__}: {reason}")


class Watched:
    """A connection whose socket its request's `Watchdog` cuts at the deadline."""

    def __init__(self, *args, watchdog: Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self.watchdog = watchdog

    def connect(self) -> None:
        super().connect()
        self.watchdog.arm(self.sock)


class WatchedHTTPConnection(Watched, http.client.HTTPConnection):
    pass


class WatchedHTTPSConnection(Watched, http.client.HTTPSConnection):
    pass


class WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(functools.partial(WatchedHTTPConnection, watchdog=req.watchdog), req)


class WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(functools.partial(WatchedHTTPSConnection, watchdog=req.watchdog), req,
                            context=self._context)


OPENER = urllib.request.build_opener(RefuseRedirect, WatchedHTTPHandler, WatchedHTTPSHandler)


def structured_output_fields(kind: str, json_schema: dict[str, Any]) -> dict[str, Any]:
    if kind == "response_format":
        schema = {"name": "dialogue", "schema": json_schema, "strict": True}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    if kind == "structured_outputs":
        return {"structured_outputs": {"json": json_schema}}
    if kind == "guided_json":
        return {"guided_json": json_schema}
    return {}


def http_failure(err: urllib.error.HTTPError) -> EngineError:
    status, headers = err.code, err.headers
    err.close()
    if status in RETRY_STATUS or status >= 500:
        return TransientError(f"HTTP {status}", retry_after_seconds(headers.get("Retry-After") if headers else None))
    if 300 <= status < 400:
        return RequestRefused(f"HTTP {status}: the endpoint redirects, and requests are not sent on "
                              "(set dialogue.endpoint_url to the address it points to)")
    if status in (401, 403):
        return EndpointRefused(f"HTTP {status}: the endpoint refused the API key (dialogue.api_key_env)")
    if status == 404:
        return EndpointRefused("HTTP 404: the endpoint serves no such model there "
                               "(dialogue.model, dialogue.endpoint_url)")
    return RequestRefused(f"HTTP {status}")


def retry_after_seconds(value: str | None) -> float | None:
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def completion_text(raw: bytes) -> str:
    """The first choice's message content; a malformed envelope is the server's fault (retry)."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, RecursionError, KeyError, IndexError, TypeError):
        raise TransientError("malformed completion envelope") from None
    if not isinstance(content, str):
        raise TransientError("completion content is not a string")
    return content


def redact_url(url: str) -> str:
    """The URL without credentials or query string, safe to log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
