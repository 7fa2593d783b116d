"""Teachers: who writes the chain-of-thought exemplar answers that SFT learns from.

Two backends behind one small interface (`generate(note, medications, gold, sample_index)` ->
`TeacherReply`):
- `gemini`: the real `google-genai` client, Gemini Developer API (key from an environment variable)
  or Vertex AI (project/location). Model, temperature, output budget, thinking budget and base URL
  come from `TeacherConfig`; the base URL is how tests aim the real client at a local server.
- `reference`: offline, no network. For each gold code it cites the note's own words (found by
  `evidence.locate`) and writes reasoning over history, medications and course, in exactly the
  `prompts` answer format. It is the embedded default, so SFT always has data.

The retry policy (`call_with_retries`), error classification and the rate-limit arithmetic
(`RateLimit`, a GCRA scheduler) are plain functions and classes here; the distill stage puts them
on Ray. One `generate` call is one attempt: retries, limits and persistence belong to the caller.
No note text is ever logged.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from icdray import codes, evidence, grammar, prompts
from icdray.config import TeacherConfig

DATA_USE_RULE = (
    "teacher.backend=gemini sends clinical notes to an external service. MIMIC-IV's PhysioNet credentialed "
    "data use agreement allows that only to services configured for no data retention (for example Vertex "
    "AI under its data-governance terms, not the consumer Gemini app); the same applies to your own "
    "institution's data under its rules. If that is your setup, say so with --set teacher.external_data_ack=true."
)


class DataUseNotAcknowledged(PermissionError):
    pass


@dataclass(frozen=True)
class TeacherReply:
    text: str | None  # None when nothing usable came back (blocked, empty)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    blocked: str = ""  # a block reason ("SAFETY", ...) when the service refused to answer


class Teacher(Protocol):
    backend: str
    model: str

    def generate(
        self, note: str, medications: Sequence[str], gold: Sequence[str] | None, sample_index: int
    ) -> TeacherReply: ...


def estimate_tokens(text: str) -> int:
    """Rough token count for rate limiting before the call (≈4 characters per token)."""
    return max(1, len(text) // 4)


# --------------------------------------------------------------------------------------- reference


class ReferenceTeacher:
    """Writes the exemplar from the gold codes and the note itself: reproducible, offline, F1 = 1.0.

    Each item is the note's own words for the code (found by `evidence.locate`: the description,
    inclusion terms and clinicians' abbreviations), then the code; the principal diagnosis first (gold
    codes come in seq_num order). The reasoning is one short line: the reason for admission and how
    many other conditions were treated or monitored, not a restatement of the codes.
    """

    backend = "reference"
    model = "reference-v3"  # bump when the exemplar text changes: it is part of the cache key

    def __init__(self, bounds: grammar.Bounds | None = None) -> None:
        self.bounds = bounds or grammar.Bounds()

    def generate(
        self, note: str, medications: Sequence[str], gold: Sequence[str] | None, sample_index: int = 0
    ) -> TeacherReply:
        if gold is None:
            raise ValueError(
                "the reference teacher writes answers from gold codes; it cannot predict without them"
            )
        b = self.bounds
        items = []
        for code in list(dict.fromkeys(codes.normalize(c) for c in gold))[: b.max_codes]:
            span = evidence.locate(code, note)
            items.append(
                prompts.CodeItem(
                    code, grammar.clean_evidence(span.text if span else "", b.max_evidence_chars)
                )
            )
        principal = codes.describe(items[0].code) if items else None
        reasoning = (
            f"Admitted for {(principal or 'the documented problem').lower()}; "
            f"{max(0, len(items) - 1)} more conditions treated or monitored."
        )
        text = prompts.render_answer(grammar.clean_reasoning(reasoning, b.max_reasoning_chars), items)
        return TeacherReply(text, estimate_tokens(note), estimate_tokens(text), "STOP")


# ------------------------------------------------------------------------------------------ gemini


class GeminiTeacher:
    """The real google-genai client. Built inside the worker that uses it (the import is heavy)."""

    backend = "gemini"

    def __init__(self, cfg: TeacherConfig) -> None:
        from google import genai
        from google.genai import types

        if not cfg.external_data_ack:
            raise DataUseNotAcknowledged(DATA_USE_RULE)
        self.cfg, self.model, self._types = cfg, cfg.model, types
        http = types.HttpOptions(
            base_url=cfg.base_url or None,
            timeout=int(cfg.deadline_s * 1000),
            retry_options=types.HttpRetryOptions(
                attempts=1
            ),  # retries are ours: counted, hint-aware, jittered
        )
        if cfg.vertexai:
            if not cfg.project:
                raise ValueError("teacher.vertexai=true needs teacher.project (and Google Cloud credentials)")
            self.client = genai.Client(
                vertexai=True, project=cfg.project, location=cfg.location, http_options=http
            )
        else:
            key = os.environ.get(cfg.api_key_env) or os.environ.get("GOOGLE_API_KEY")
            if not key:
                raise ValueError(
                    f"teacher.backend=gemini needs an API key in ${cfg.api_key_env} (or $GOOGLE_API_KEY), "
                    f"or teacher.vertexai=true with a project"
                )
            self.client = genai.Client(api_key=key, http_options=http)

    def generate(
        self, note: str, medications: Sequence[str], gold: Sequence[str] | None, sample_index: int = 0
    ) -> TeacherReply:
        types = self._types
        messages = prompts.teacher_messages(note, medications, gold if self.cfg.show_gold else None)
        config = types.GenerateContentConfig(
            system_instruction=messages[0]["content"],
            temperature=self.cfg.temperature,
            max_output_tokens=self.cfg.max_output_tokens,
            candidate_count=1,
            seed=sample_seed(note, sample_index),
            thinking_config=(
                types.ThinkingConfig(thinking_budget=self.cfg.thinking_budget)
                if self.cfg.thinking_budget >= 0
                else None
            ),
        )
        resp = self.client.models.generate_content(
            model=self.model, contents=messages[1]["content"], config=config
        )
        usage = resp.usage_metadata
        tokens_in = (usage.prompt_token_count or 0) if usage else 0
        tokens_out = ((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)) if usage else 0
        feedback = resp.prompt_feedback
        if feedback is not None and feedback.block_reason:
            return TeacherReply(None, tokens_in, tokens_out, "", str(feedback.block_reason.value))
        if not resp.candidates:
            raise EmptyResponse("no candidates in the response")
        cand = resp.candidates[0]
        finish = cand.finish_reason.value if cand.finish_reason else ""
        text = (
            "".join(p.text or "" for p in (cand.content.parts or []) if not p.thought) if cand.content else ""
        )
        if finish in ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION") and not text:
            return TeacherReply(None, tokens_in, tokens_out, finish, finish)
        if not text:
            raise EmptyResponse(f"empty candidate (finish reason {finish or 'none'})")
        return TeacherReply(text, tokens_in, tokens_out, finish)


class EmptyResponse(RuntimeError):
    """A well-formed response with nothing in it: transient on the service side, so retried."""


def sample_seed(note: str, sample_index: int) -> int:
    """A per-(note, sample) seed: the k samples of a note differ, and a repeat of one is reproducible."""
    return zlib.crc32(f"{sample_index}:{note}".encode()) & 0x7FFFFFFF


def make_teacher(cfg: TeacherConfig, bounds: grammar.Bounds | None = None) -> Teacher:
    if cfg.backend == "reference":
        return ReferenceTeacher(bounds)
    if cfg.backend == "gemini":
        return GeminiTeacher(cfg)
    raise ValueError(f"unknown teacher.backend {cfg.backend!r}: use reference or gemini")


def check_data_use(cfg: TeacherConfig) -> None:
    """Refuse before any call when notes would leave the machine without an explicit acknowledgement."""
    if cfg.backend != "reference" and not cfg.external_data_ack:
        raise DataUseNotAcknowledged(DATA_USE_RULE)


# ----------------------------------------------------------------------------------------- retries

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_DELAY = re.compile(r"^([0-9.]+)s$")


@dataclass(frozen=True)
class Failure:
    retryable: bool
    kind: str  # http_429, http_500, timeout, transport, empty, malformed, http_400, error
    hint_s: float | None = None  # the server's retry hint (RetryInfo retryDelay or Retry-After)


def classify(exc: BaseException) -> Failure:
    """Which failures are worth another attempt, and what the server asked us to wait."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 100 <= code < 600:
        return Failure(code in RETRY_STATUS, f"http_{code}", _retry_hint(exc))
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"TimeoutException", "TimeoutError", "ReadTimeout", "ConnectTimeout"}:
        return Failure(True, "timeout")
    if names & {"TransportError", "ConnectionError", "RemoteProtocolError", "NetworkError"}:
        return Failure(True, "transport")
    if isinstance(exc, EmptyResponse):
        return Failure(True, "empty")
    if isinstance(exc, json.JSONDecodeError):  # a truncated or garbled response body
        return Failure(True, "malformed")
    return Failure(False, "error")


def _retry_hint(exc: BaseException) -> float | None:
    details = getattr(exc, "details", None)
    err = details.get("error", {}) if isinstance(details, dict) else {}
    for d in err.get("details", []) if isinstance(err, dict) else []:
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("RetryInfo"):
            m = _DELAY.match(str(d.get("retryDelay", "")))
            if m:
                return float(m.group(1))
    response = getattr(exc, "response", None)
    header = (
        response.headers.get("retry-after") if response is not None and hasattr(response, "headers") else None
    )
    try:
        return float(header) if header else None
    except ValueError:
        return None


def backoff_s(attempt: int, cfg: TeacherConfig, rng: random.Random, hint: float | None = None) -> float:
    """Exponential backoff with full jitter, never shorter than the server's hint."""
    cap = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1))
    return max(hint or 0.0, rng.uniform(0, cap))


@dataclass(frozen=True)
class CallResult:
    status: str  # ok | blocked | failed
    reply: TeacherReply | None
    attempts: int
    retries: int
    error: str = ""
    latency_s: float = 0.0
    throttled: int = 0  # 429 answers received


def call_with_retries(
    fn: Callable[[], TeacherReply],
    cfg: TeacherConfig,
    *,
    before_attempt: Callable[[], None] = lambda: None,
    on_throttle: Callable[[float], None] = lambda s: None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> CallResult:
    """One logical teacher call: attempts until success, a non-retryable error, or the budget runs out."""
    rng = rng or random.Random()
    start = time.monotonic()
    throttled = 0
    last = ""
    for attempt in range(1, cfg.max_attempts + 1):
        before_attempt()
        try:
            reply = fn()
        except Exception as exc:  # classified, recorded, never swallowed silently
            failure = classify(exc)
            last = f"{failure.kind}: {type(exc).__name__}: {_short(exc)}"
            if failure.kind == "http_429":
                throttled += 1
                on_throttle(failure.hint_s or 0.0)
            if not failure.retryable or attempt == cfg.max_attempts:
                return CallResult(
                    "failed", None, attempt, attempt - 1, last, time.monotonic() - start, throttled
                )
            sleep(backoff_s(attempt, cfg, rng, failure.hint_s))
            continue
        status = "blocked" if reply.blocked else "ok"
        err = f"blocked: {reply.blocked}" if reply.blocked else ""
        return CallResult(status, reply, attempt, attempt - 1, err, time.monotonic() - start, throttled)
    return CallResult(
        "failed", None, cfg.max_attempts, cfg.max_attempts - 1, last, time.monotonic() - start, throttled
    )


def _short(exc: BaseException, limit: int = 300) -> str:
    """Error text for the record: the service's message, never request content."""
    msg = getattr(exc, "message", None) or str(exc)
    return str(msg).replace("\n", " ")[:limit]


# ------------------------------------------------------------------------------------- rate limits


class RateLimit:
    """Requests and tokens per minute as a GCRA schedule: every reservation gets its own start time.

    Requests are spaced `60 / rpm` seconds apart and token reservations advance a second clock by
    `tokens * 60 / tpm`, so no 60-second window ever holds more than the limit (no bursts that the
    service would answer with 429), and a steady stream runs at the full rate.
    """

    def __init__(self, rpm: int = 0, tpm: int = 0, margin: float = 0.0) -> None:
        # `margin` keeps the schedule a little under the limit: network jitter can bunch requests that left
        # exactly 60/rpm apart, and the service counts arrivals, not departures.
        self.rpm, self.tpm = rpm * (1 - margin), tpm * (1 - margin)
        self._next_request = 0.0
        self._next_token = 0.0

    def reserve(self, tokens: int, now: float) -> float:
        """Book one request of `tokens`; returns how long the caller must wait before sending it."""
        start = now
        if self.rpm > 0:
            start = max(start, self._next_request)
        if self.tpm > 0:
            start = max(start, self._next_token)
        if self.rpm > 0:
            self._next_request = start + 60.0 / self.rpm
        if self.tpm > 0:
            self._next_token = start + tokens * 60.0 / self.tpm
        return start - now

    def penalize(self, seconds: float, now: float) -> None:
        """The service said slow down: nobody sends before `now + seconds`."""
        self._next_request = max(self._next_request, now + seconds)
        if self.tpm > 0:
            self._next_token = max(self._next_token, now + seconds)


def cost_usd(tokens_in: int, tokens_out: int, cfg: TeacherConfig) -> float:
    return tokens_in / 1e6 * cfg.price_input_per_mtok + tokens_out / 1e6 * cfg.price_output_per_mtok
