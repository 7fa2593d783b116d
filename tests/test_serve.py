"""The Serve app over real HTTP on 127.0.0.1: schema, batching under concurrency, bad input, auth, privacy,
and the coder page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from icdray import codes

NOTE = (
    "Brief Hospital Course: 67 yo man with HTN and type 2 diabetes admitted with acute kidney injury. "
    "Creatinine improved with fluids. Continue lisinopril and metformin. Secret marker ZQXJ-7781."
)
# the tiny random model under the grammar: short reasoning and evidence so answers close within the budget
TINY = {
    "checkpoint": "tiny",
    "max_new_tokens": 96,
    "max_reasoning_chars": 8,
    "max_evidence_chars": 12,
    "max_codes": 3,
    "max_batch_size": 16,
    "batch_wait_timeout_s": 0.1,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: object = None, *, raw: bytes | None = None, ctype="application/json", headers=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", ctype)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null") if "json" in r.headers.get(
                "content-type", ""
            ) else r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _wait(url: str, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if call(url + "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy")


@pytest.fixture(scope="module")
def server(ray_session):
    from ray import serve

    from serve_app.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(TINY), name="coder", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    _wait(url)
    yield url
    serve.delete("coder")


@pytest.mark.slow
def test_happy_path_schema(server):
    status, out = call(server + "/v1/code", {"note": NOTE, "medications": ["lisinopril", "metformin"]})
    assert status == 200, out
    assert set(out) == {"codes", "reasoning", "model", "latency_ms"}
    assert out["model"] == "tiny" and out["latency_ms"] > 0
    assert out["codes"], "the constrained tiny model produced no code"
    for c in out["codes"]:
        assert set(c) == {"code", "description", "evidence", "evidence_span", "valid"}
        assert c["valid"] and codes.is_billable(c["code"])  # the grammar allows billable codes only
        assert c["description"] == codes.describe(c["code"])
        if c["evidence_span"]:
            s, e = c["evidence_span"]
            assert 0 <= s < e <= len(NOTE)
    schema = call(server + "/openapi.json")[1]
    assert "/v1/code" in schema["paths"] and "CodeResponse" in json.dumps(schema)


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_answered(server):
    notes = [f"{NOTE} Patient number {i}." for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda n: call(server + "/v1/code", {"note": n}), notes))
    assert all(s == 200 for s, _ in results), [r for r in results if r[0] != 200][:2]
    assert all(all(c["valid"] for c in out["codes"]) for _, out in results)
    stats = call(server + "/v1/model")[1]["stats"]
    assert stats["max_batch"] > 1, stats  # several clients shared one engine call
    assert stats["batches"] < stats["requests"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, kwargs, status",
    [
        ("missing note", {"body": {"medications": []}}, 422),
        ("empty note", {"body": {"note": ""}}, 422),
        ("blank note", {"body": {"note": "   \n"}}, 422),
        ("non-string note", {"body": {"note": 123}}, 422),
        ("non-string medication", {"body": {"note": NOTE, "medications": [1]}}, 422),
        ("unknown field", {"body": {"note": NOTE, "temperature": 2}}, 422),
        ("invalid JSON", {"raw": b'{"note": "abc"'}, 400),
        ("not an object", {"body": ["a note"]}, 422),
        ("wrong content type", {"raw": b"note=abc", "ctype": "application/x-www-form-urlencoded"}, 415),
        ("oversize body", {"body": {"note": "x" * 300_000}}, 413),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_healthy(server, case, kwargs, status):
    got, out = call(server + "/v1/code", **kwargs)
    assert got == status, (case, out)
    assert isinstance(out, dict) and out["error"]
    assert "ZQXJ" not in json.dumps(out)  # errors never echo the note
    assert call(server + "/healthz") == (200, {"status": "ok"})


@pytest.mark.slow
def test_note_text_is_not_logged(server):
    marker = "PRIVATE-MARKER-Q8W7E6"
    assert call(server + "/v1/code", {"note": f"{NOTE} {marker}"})[0] == 200
    assert call(server + "/v1/code", {"note": marker, "bogus": 1})[0] == 422
    time.sleep(1.0)
    logs = Path("/tmp/ray/session_latest/logs")
    hits = [p for p in logs.rglob("*") if p.is_file() and marker in p.read_text(errors="ignore")]
    assert not hits, hits


@pytest.mark.slow
def test_bearer_token_auth(server):
    from ray import serve

    from serve_app.app import build_app

    env = {"env_vars": {"ICDRAY_API_TOKEN": "s3cret"}}
    app = build_app(TINY, ray_actor_options={"num_cpus": 0.5, "runtime_env": env})
    serve.run(app, name="coder-auth", route_prefix="/auth", blocking=False)
    url = server + "/auth"
    _wait(url)
    try:
        assert call(url + "/v1/code", {"note": NOTE})[0] == 401
        assert call(url + "/v1/code", {"note": NOTE}, headers={"Authorization": "Bearer wrong"})[0] == 401
        status, out = call(url + "/v1/code", {"note": NOTE}, headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and "codes" in out
        assert call(url + "/healthz")[0] == 200  # health stays open for load balancers
        assert call(server + "/v1/code", {"note": NOTE})[0] == 200  # the app without a token stays open
    finally:
        serve.delete("coder-auth")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (make setup installs it)"
)
def test_coder_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(server + "/")
        page.click("#example")
        page.wait_for_function("document.getElementById('note').value.length > 100")
        page.fill("#note", NOTE)
        page.click("#submit")
        page.wait_for_selector("#codes tbody tr", timeout=120_000)
        rows = page.locator("#codes tbody tr")
        n = rows.count()
        assert n >= 1
        shown = [rows.nth(i).get_attribute("data-code") for i in range(n)]
        assert all(codes.is_billable(c) for c in shown)
        # evidence found in the note is highlighted there
        found = [i for i in range(n) if "not found in note" not in rows.nth(i).inner_text()]
        marks = page.locator("#note-view mark").count()
        assert (marks >= 1) == bool(found) and marks <= len(found)
        assert NOTE[:40] in page.text_content("#note-view")
        rows.nth(0).locator("button.toggle").click()
        assert "rejected" in (rows.nth(0).get_attribute("class") or "")
        with page.expect_download() as dl:
            page.click("#export-btn")
        exported = json.loads(Path(dl.value.path()).read_text())
        assert [c["code"] for c in exported["codes"]] == shown[1:]
        assert json.loads(page.text_content("#export")) == exported
        browser.close()
