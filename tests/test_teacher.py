"""Retry policy, error classification and the rate-limit schedule (pure logic, milliseconds)."""

import json
import random

import pytest

from icdray import prompts, teacher
from icdray.config import TeacherConfig


class HTTPError(Exception):
    def __init__(self, code, details=None):
        super().__init__(f"{code}")
        self.code, self.details = code, details or {}


def _retry_info(seconds):
    return {
        "error": {
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{seconds}s"}]
        }
    }


def test_classify():
    assert teacher.classify(HTTPError(429, _retry_info(7))) == teacher.Failure(True, "http_429", 7.0)
    assert teacher.classify(HTTPError(503)).retryable and not teacher.classify(HTTPError(400)).retryable
    assert not teacher.classify(HTTPError(403)).retryable
    assert teacher.classify(TimeoutError()).kind == "timeout"
    assert teacher.classify(ConnectionError()).kind == "transport"
    assert teacher.classify(json.JSONDecodeError("x", "{", 0)).kind == "malformed"
    assert teacher.classify(teacher.EmptyResponse("none")).retryable
    assert not teacher.classify(KeyError("bug")).retryable


def test_backoff_is_jittered_exponential_and_honours_hints():
    cfg = TeacherConfig(backoff_initial_s=1.0, backoff_max_s=8.0)
    rng = random.Random(0)
    for attempt in range(1, 8):
        delays = [teacher.backoff_s(attempt, cfg, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= min(8.0, 2 ** (attempt - 1))
        assert len(set(delays)) > 150  # jittered
    assert teacher.backoff_s(1, cfg, rng, hint=5.0) >= 5.0


def test_call_with_retries_counts_and_stops():
    cfg = TeacherConfig(max_attempts=4, backoff_initial_s=0.01)
    slept, throttles = [], []
    script = iter([HTTPError(429, _retry_info(2)), HTTPError(500), teacher.TeacherReply("answer", 10, 5)])

    def fn():
        item = next(script)
        if isinstance(item, Exception):
            raise item
        return item

    r = teacher.call_with_retries(fn, cfg, sleep=slept.append, on_throttle=throttles.append)
    assert (r.status, r.attempts, r.retries, r.throttled) == ("ok", 3, 2, 1)
    assert slept[0] >= 2.0 and throttles == [2.0]
    failing = teacher.call_with_retries(
        lambda: (_ for _ in ()).throw(HTTPError(500)), cfg, sleep=lambda s: None
    )
    assert (failing.status, failing.attempts) == ("failed", 4) and "http_500" in failing.error
    fatal = teacher.call_with_retries(
        lambda: (_ for _ in ()).throw(HTTPError(400)), cfg, sleep=lambda s: None
    )
    assert (fatal.status, fatal.attempts) == ("failed", 1)
    blocked = teacher.call_with_retries(lambda: teacher.TeacherReply(None, blocked="SAFETY"), cfg)
    assert blocked.status == "blocked" and blocked.attempts == 1


@pytest.mark.parametrize("rpm", [60, 600, 3000])
def test_rate_limit_never_exceeds_the_limit_in_any_window(rpm):
    limit = teacher.RateLimit(rpm=rpm)
    now, starts = 100.0, []
    for i in range(rpm * 2):  # a burst of requests arriving together, in clumps
        now += 0.0 if i % 50 else 0.3
        starts.append(now + limit.reserve(1, now))
    starts.sort()
    j = 0
    for i, t in enumerate(starts):  # sliding 60 s window over start times
        while starts[j] <= t - 60 + 1e-6:  # float spacing: 600 x 0.1 s may sum to 59.9999999
            j += 1
        assert i - j + 1 <= rpm
    rate = (len(starts) - 1) / (starts[-1] - starts[0]) * 60
    assert rate == pytest.approx(rpm, rel=1e-6)  # a steady backlog runs at the full rate


def test_token_limit_and_penalty():
    limit = teacher.RateLimit(tpm=6000)
    assert limit.reserve(3000, 0.0) == 0.0
    assert limit.reserve(3000, 0.0) == pytest.approx(30.0)  # the first booking used half a minute of tokens
    limit.penalize(100.0, 0.0)
    assert limit.reserve(1, 0.0) == pytest.approx(100.0)
    assert teacher.RateLimit(rpm=600, margin=0.02).rpm == pytest.approx(588)


def test_reference_teacher_needs_gold():
    with pytest.raises(ValueError, match="gold"):
        teacher.ReferenceTeacher().generate("note", [], None)
    reply = teacher.ReferenceTeacher().generate("Patient with HTN and AKI.", ["Lisinopril"], ["I10", "N179"])
    # each item: the note's own short phrase for the code, then the code; the principal first
    assert '{"evidence": "HTN", "code": "I10"}, {"evidence": "AKI", "code": "N17.9"}' in reply.text
    ans = prompts.parse_answer(reply.text)
    assert ans.clean and ans.codes == ["I10", "N17.9"]
    assert ans.reasoning.startswith("Admitted for essential (primary) hypertension")
    assert "1 more conditions" in ans.reasoning


def test_reference_teacher_stays_within_the_grammar_bounds():
    from icdray import grammar

    bounds = grammar.Bounds(max_reasoning_chars=30, max_evidence_chars=3, max_codes=1)
    note = "Patient with acute kidney injury and HTN."
    reply = teacher.ReferenceTeacher(bounds).generate(note, [], ["N179", "I10"])
    ans = prompts.parse_answer(reply.text)
    assert ans.codes == ["N17.9"]  # at most max_codes, the principal kept
    assert len(ans.reasoning) <= 30 and all(len(i.evidence) <= 3 for i in ans.items)
