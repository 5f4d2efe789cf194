"""Fixtures: the tiny SD pipeline the generators load, and for the LLM engines a tiny random Llama
chat model saved to disk and a small OpenAI-compatible chat server on 127.0.0.1 that answers from a script."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """The tiny SD2-like pipeline folder (read only: tests that change a model save a copy)."""
    from factory.tiny.sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from factory.tiny.llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # the completion text; None: answer a good dialogue for the prompt
    delay_s: float = 0.0
    raw: bytes | None = None  # a whole response body, sent as is
    retry_after: str | None = None
    length: int | None = None  # a Content-Length other than the body's (then the server closes)
    drip_s: float = 0.0  # send the body a byte at a time, this far apart
    header_drip_s: float = 0.0  # after the status line, send header bytes this far apart, without end
    wire: bytes | None = None  # the whole answer, sent as is instead of HTTP (no status line, no headers)
    location: str | None = None  # a Location header (with a 3xx status: a redirect)


def good_dialogue(body: dict) -> str:
    """A valid answer built from the prompt's instruction line."""
    prompt = body["messages"][-1]["content"]
    line = next((ln for ln in prompt.splitlines() if ln.startswith("Instruction")), "Instruction: a new image")
    instruction = line.split(":", 1)[1].strip()
    return json.dumps({
        "user": f"Could you show me {instruction}, please?",
        "assistant": f"I drew {instruction}; the subject keeps its own look.",
    })


# The request fields of OpenAI's chat completions API (POST /v1/chat/completions); OpenAI answers 400
# "Unrecognized request argument supplied" to any other.
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})
# vLLM's OpenAI server extras, only those the openai engine sends (its `structured_output` setting)
VLLM_CHAT_EXTRAS = frozenset({"structured_outputs", "guided_json"})


class ChatServer:
    """Serves POST /v1/chat/completions. A request whose last message contains a rule's marker
    gets that rule's next reply (the last one repeats); other requests get a good dialogue.

    Like a server started with an API key (`vllm serve --api-key`), it answers 401 unless the request
    carries `Authorization: Bearer <api_key>`; with `api_key=None` (no key configured) it takes any request,
    as vLLM does. A request for a model other than `model` gets 404, as vLLM's. A body that is not a JSON
    object with `model` and `messages`, or that holds a field outside the chat completions API and the vLLM
    extras above, gets 400. Every request is kept in `requests`, refused ones too (a GET is kept and
    answered 405); only accepted ones reach the rules. `cut_off` counts answers the client stopped reading."""

    def __init__(self, api_key: str | None = None, model: str = "llama-test"):
        self.api_key = api_key
        self.model = model
        self.rules: dict[str, list[Reply]] = {}
        self.calls: dict[str, int] = {}
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        self.in_flight = 0
        self.max_in_flight = 0
        self.cut_off = 0
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self._http.block_on_close = False
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}/v1"

    def rule(self, marker: str, *replies: Reply) -> None:
        self.rules[marker] = list(replies)
        self.calls[marker] = 0

    def _reply_for(self, body: dict) -> tuple[str | None, Reply]:
        prompt = body["messages"][-1]["content"]
        with self._lock:
            for marker, replies in self.rules.items():
                if marker in prompt:
                    index = min(self.calls[marker], len(replies) - 1)
                    self.calls[marker] += 1
                    return marker, replies[index]
        return None, Reply()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                with server._lock:
                    server.requests.append((dict(self.headers), body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self._open = True
                try:
                    self._answer(body)
                finally:
                    self._close_request()

            def do_GET(self):  # noqa: N802
                self._open = False
                with server._lock:
                    server.requests.append((dict(self.headers), None))
                self._send(405, b'{"error": "Method Not Allowed"}')

            def _close_request(self):
                # before the answer is written: once the client has it, it may send its next request
                if self._open:
                    self._open = False
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body):
                if self.path != "/v1/chat/completions":
                    return self._send(404, b"{}")
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, b'{"error": "Unauthorized"}')
                problem = request_problem(body)
                if not problem and body["model"] != server.model:  # as `vllm serve` answers another model name
                    message = f"The model `{body['model']}` does not exist."
                    return self._send(404, json.dumps({"error": {"message": message, "type": "NotFoundError",
                                                                 "param": "model", "code": 404}}).encode())
                if problem:
                    return self._send(400, json.dumps({"error": {"message": problem, "type": "BadRequestError",
                                                                 "code": 400}}).encode())
                _, reply = server._reply_for(body)
                time.sleep(reply.delay_s)
                if reply.header_drip_s:
                    return self._drip_headers(reply.header_drip_s)
                if reply.wire is not None:
                    self._close_request()
                    return self.wfile.write(reply.wire)
                if reply.raw is not None:
                    return self._send(reply.status, reply.raw, reply)
                if reply.status != 200:
                    return self._send(reply.status, b'{"error": {"message": "scripted failure"}}', reply)
                content = reply.content if reply.content is not None else good_dialogue(body)
                answer = {"id": "cmpl-test", "object": "chat.completion", "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(answer).encode(), reply)

            def _send(self, status, payload, reply=None):
                reply = reply or Reply()
                self._close_request()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload) if reply.length is None else reply.length))
                    if reply.retry_after is not None:
                        self.send_header("Retry-After", reply.retry_after)
                    if reply.location is not None:
                        self.send_header("Location", reply.location)
                    self.end_headers()
                    self._write(payload, reply.drip_s)
                except (BrokenPipeError, ConnectionResetError):
                    with server._lock:
                        server.cut_off += 1

            def _drip_headers(self, drip_s):
                self._close_request()
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    for _ in range(int(30 / drip_s)):
                        time.sleep(drip_s)
                        self.wfile.write(b"a")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    with server._lock:
                        server.cut_off += 1

            def _write(self, payload, drip_s):
                if not drip_s:
                    return self.wfile.write(payload)
                for byte in payload:
                    time.sleep(drip_s)
                    self.wfile.write(bytes([byte]))

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._http.shutdown()
        self._http.server_close()


def request_problem(body) -> str | None:
    """Why the chat completions API refuses `body` (the parts the openai engine could get wrong), or None."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    unknown = sorted(body.keys() - OPENAI_CHAT_FIELDS - VLLM_CHAT_EXTRAS)
    if unknown:
        return f"Unrecognized request argument supplied: {', '.join(unknown)}"
    if not isinstance(body.get("model"), str):
        return "'model' is a required string"
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)):
        return "'messages' must be a non-empty list of {role, content} objects"
    return None


@pytest.fixture
def llm_api_key() -> str | None:
    """The key the chat server expects (None: no key configured); a test module that configures one overrides this."""
    return None


@pytest.fixture
def chat_server(llm_api_key):
    with ChatServer(api_key=llm_api_key) as server:
        yield server
