"""A local HTTP server that speaks the Gemini REST protocol for `generateContent`.

Tests and benchmarks point the real `google-genai` client at it through its base-URL option, so the
whole client path (request building, JSON parsing, error classes, timeouts) runs for real while the
answers, failures and latency are scripted. It keeps its own call log, which is what the tests
assert on (no request repeated after it was answered, 429s caused by the client, ...).

Request: POST /v1beta/models/{model}:generateContent (or the Vertex path .../models/{m}:generateContent)
with `contents`, `systemInstruction`, `generationConfig`. Response: `candidates[].content.parts[].text`,
`finishReason`, `usageMetadata`, or an error body `{"error": {"code", "message", "status", "details"}}`
whose 429 carries a `google.rpc.RetryInfo` `retryDelay` hint, as the real service sends.

Not a model: a `responder` callable decides every reply.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PATH = re.compile(r"/models/([^/:]+):generateContent$")


@dataclass(frozen=True)
class Request:
    model: str
    system: str
    user: str
    config: dict[str, Any]

    @property
    def key(self) -> str:
        """Identity of a request: prompt and sampling seed (distinct samples of a note differ by seed)."""
        return hashlib.sha256(f"{self.user}\x00{self.config.get('seed')}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # JSON-serialisable, or bytes sent as they are (malformed responses)
    delay_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()


def ok(text: str, prompt_tokens: int = 100, output_tokens: int = 50, finish: str = "STOP") -> Reply:
    return Reply(
        200,
        {
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish, "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens,
            },
            "modelVersion": "local-gemini",
        },
    )


def error(code: int, status: str, message: str = "error", retry_delay_s: float | None = None) -> Reply:
    details = []
    headers: tuple[tuple[str, str], ...] = ()
    if retry_delay_s is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_delay_s}s"}
        )
        headers = (("Retry-After", str(max(1, round(retry_delay_s)))),)
    return Reply(
        code,
        {"error": {"code": code, "message": message, "status": status, "details": details}},
        headers=headers,
    )


def blocked() -> Reply:
    """The prompt was blocked for safety: no candidates, a promptFeedback block reason."""
    return Reply(
        200,
        {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": 100, "totalTokenCount": 100},
        },
    )


def safety_stopped() -> Reply:
    """A candidate stopped for safety, without content."""
    return Reply(
        200,
        {
            "candidates": [{"finishReason": "SAFETY", "index": 0}],
            "usageMetadata": {"promptTokenCount": 100, "totalTokenCount": 100},
        },
    )


def empty() -> Reply:
    return Reply(200, {"candidates": [], "usageMetadata": {"promptTokenCount": 100}})


def malformed() -> Reply:
    return Reply(200, b'{"candidates": [{"content": {"parts": [{"text": "trunc')


@dataclass
class Call:
    t: float
    key: str
    model: str
    status: int
    throttled: bool = False


@dataclass
class _State:
    responder: Callable[[Request], Reply]
    rpm: int | None
    window_s: float = 60.0
    calls: list[Call] = field(default_factory=list)
    window: deque = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    gate: threading.Event = field(default_factory=threading.Event)


class GeminiServer:
    """`with GeminiServer(responder, rpm=600) as s: genai.Client(http_options={"base_url": s.url})`."""

    def __init__(
        self, responder: Callable[[Request], Reply], rpm: int | None = None, window_s: float = 60.0
    ) -> None:
        """`rpm`: requests per minute enforced over a sliding `window_s` (rpm * window_s / 60 requests per
        window); a shorter window punishes bursts the way quota systems with burst control do."""
        self.state = _State(responder, rpm, window_s)
        self.state.gate.set()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def calls(self) -> list[Call]:
        with self.state.lock:
            return list(self.state.calls)

    def pause(self) -> None:
        """Hold every new request (no reply) until `resume`: freezes a client mid-run."""
        self.state.gate.clear()

    def resume(self) -> None:
        self.state.gate.set()

    def start(self) -> GeminiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.resume()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> GeminiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    return "".join(p.get("text", "") for p in content.get("parts", []) if isinstance(p, dict))


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: tests read the call log instead
            pass

        def do_POST(self) -> None:
            m = _PATH.search(self.path.split("?")[0])
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not m:
                self._send(error(404, "NOT_FOUND", f"unknown path {self.path}"))
                return
            req = Request(
                m.group(1),
                _text(body.get("systemInstruction")),
                "".join(_text(c) for c in body.get("contents", [])),
                body.get("generationConfig", {}),
            )
            state.gate.wait()
            if self._client_gone():  # held while paused and the client died meanwhile: nothing to answer
                return
            now = time.time()
            with state.lock:
                while state.window and state.window[0] <= now - state.window_s:
                    state.window.popleft()
                allowed = state.rpm * state.window_s / 60 if state.rpm is not None else None
                throttled = allowed is not None and len(state.window) >= allowed
                if not throttled and allowed is not None:
                    state.window.append(now)
                wait = state.window_s - (now - state.window[0]) if throttled else 0.0
            reply = (
                error(429, "RESOURCE_EXHAUSTED", "Quota exceeded (requests per minute)", wait)
                if throttled
                else state.responder(req)
            )
            if reply.delay_s:
                time.sleep(reply.delay_s)
            try:
                self._send(reply)
            except OSError:  # the client went away: the reply was not delivered, do not log it as answered
                return
            with state.lock:
                state.calls.append(Call(time.time(), req.key, req.model, reply.status, throttled))

        def _client_gone(self) -> bool:
            import select
            import socket

            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _send(self, reply: Reply) -> None:
            data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

    return Handler
