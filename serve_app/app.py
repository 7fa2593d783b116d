"""Ray Serve app: the ICD-10-CM coder over HTTP, and the coder's workstation page at `/`.

    POST /v1/code {note, medications?, age?, sex?} --guard (size, type, gzip, auth), validation-->
        chat.encode_prompt --vLLM async engine (continuous batching; grammar of the label space)-->
        prompts.parse_answer -> per code: description, evidence span, calibrated confidence, role, sequence
        -> edits (coding edits + CMS MCE), drg (MS-DRG v43.1 grouping) -> feedback store (the chart) -> JSON
    POST /v1/feedback {request_id, code, action, user, new_code?} -> one row in the feedback database
    POST /v1/review {codes, age?, sex?} -> edits and DRG of the coder's current selection (the page's panel)
    GET /healthz, /v1/model, /v1/example, / (the page), /docs, /openapi.json

`serve run serve_app/serve_config.yaml` for development, `serve deploy` for a cluster, or
`icdray serve --checkpoint PATH --storage DIR`. Every knob arrives in `user_config`, so a `serve deploy`
with a new config reloads the model in place. Batching: `continuous` (default: vLLM's async engine,
each request joins the running batch) or `static` (`@serve.batch` around one blocking engine call, the
benchmark's reference; also the transformers backend's mode).

Privacy: the note is never logged; errors name the field, not its content. The feedback database keeps
the note with its codes (the training data needs it). Auth: when the environment variable named by
`ICDRAY_TOKEN_ENV` (default `ICDRAY_API_TOKEN`) is set in the replica, every /v1 route needs
`Authorization: Bearer <token>`. Metrics (codes emitted, invalid codes, edits by rule, feedback actions,
latency) go to Ray's Prometheus endpoint through `ray.serve.metrics`.
Left out: streaming responses, per-client rate limits (put a gateway in front), multi-model routing.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import json
import logging
import os
import re
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from ray import serve

log = logging.getLogger("ray.serve")
MAX_BODY_BYTES = 256 * 1024  # a long discharge note is ~30 KB; this leaves room and stops abuse
MAX_NOTE_CHARS = 100_000
PAGE = Path(__file__).with_name("static") / "index.html"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, newline and carriage return are text
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
DEFAULTS: dict[str, Any] = {
    "checkpoint": "smollm2-135m",  # a checkpoint folder (checkpoints/grpo, checkpoints/sft) or a registry name
    "storage": "",  # the run's storage root: its label space, calibration and (by default) feedback database
    "feedback_url": "",  # SQLAlchemy URL of the feedback database; "" = SQLite under `storage` (none without)
    # the engine's settings (config.EngineConfig): backend vllm|hf, dtype, device, constrained, ...
    "engine": {"backend": "vllm", "threads_bind": "auto", "kv_cache_gb": 2},
    "batching": "continuous",  # continuous (vLLM async engine) | static (@serve.batch, one blocking call)
    "max_new_tokens": 512,  # free (unconstrained) answers; constrained ones get the grammar's own budget
    "max_prompt_tokens": 2048,
    # grammar bounds (grammar.Bounds): every constrained answer closes within Bounds.worst_case_tokens()
    "max_reasoning_chars": 300,
    "max_evidence_chars": 60,
    "max_codes": 25,
    "max_batch_size": 8,  # static batching only
    "batch_wait_timeout_s": 0.05,
}


class CodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: StrictStr = Field(min_length=1, max_length=MAX_NOTE_CHARS, description="discharge note text")
    medications: list[StrictStr] | None = Field(default=None, description="discharge medications")
    age: int | None = Field(default=None, ge=0, le=130, description="age at admission (MCE age edits)")
    sex: Literal["M", "F", "U"] | None = Field(default=None, description="sex (M, F, U)")

    @field_validator("note")
    @classmethod
    def _text(cls, v: str) -> str:
        if _CONTROL.search(v):
            raise ValueError("note contains control characters (NUL or other non-printing bytes)")
        if not v.strip():
            raise ValueError("note is blank")
        return v

    @field_validator("medications")
    @classmethod
    def _meds(cls, v: list[str] | None) -> list[str] | None:
        if v and any(_CONTROL.search(m) for m in v):
            raise ValueError("medications contain control characters")
        return v


class CodeOut(BaseModel):
    code: str
    description: str
    evidence: str
    evidence_span: list[int] | None = Field(description="[start, end) of the evidence in the submitted note")
    valid: bool
    confidence: float = Field(description="calibrated probability that the code is right (validation split)")
    role: Literal["principal", "secondary"]
    sequence: int
    supported: bool = Field(
        default=True,
        description="the quote is in the note and the confidence reaches the decision rule's validation-tuned cut",
    )


class EditOut(BaseModel):
    severity: Literal["error", "warning"]
    rule: str
    codes: list[str]
    message: str


class CodeResponse(BaseModel):
    request_id: str
    codes: list[CodeOut]
    reasoning: str
    edits: list[EditOut]
    drg: dict[str, Any] | None
    auto_eligible: bool
    model: str
    latency_ms: float


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr = Field(min_length=1, max_length=64)
    code: StrictStr = Field(min_length=1, max_length=16)
    action: Literal["accept", "reject", "edit", "add", "principal"]
    user: StrictStr = Field(min_length=1, max_length=128)
    new_code: StrictStr | None = Field(default=None, max_length=16)


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    codes: list[StrictStr] = Field(max_length=100)
    age: int | None = Field(default=None, ge=0, le=130)
    sex: Literal["M", "F", "U"] | None = None


def _error(status: int, error: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class Guard:
    """ASGI middleware before any route: auth, body size, content type and content encoding.

    A gzip body is decompressed (at most MAX_BODY_BYTES of it) and handed on as plain JSON; a body that
    claims gzip but is not is refused (400), as is any other encoding (415).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/v1/"):
            token = os.environ.get(os.environ.get("ICDRAY_TOKEN_ENV", "ICDRAY_API_TOKEN"), "")
            sent = headers.get("authorization", "")
            if token and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return await _error(401, "unauthorized", "send Authorization: Bearer <token>")(
                    scope, receive, send
                )
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        size = headers.get("content-length")
        if size is None:
            return await _error(411, "length required", "send a Content-Length header")(scope, receive, send)
        if not size.isdigit() or int(size) > MAX_BODY_BYTES:
            return await _error(413, "request too large", f"the body must be at most {MAX_BODY_BYTES} bytes")(
                scope, receive, send
            )
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return await _error(415, "unsupported media type", "send Content-Type: application/json")(
                scope, receive, send
            )
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("identity", ""):
            return await self.app(scope, receive, send)
        if encoding != "gzip":
            return await _error(415, "unsupported content encoding", "send identity or gzip")(
                scope, receive, send
            )
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            plain = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(body, MAX_BODY_BYTES + 1)
            if len(plain) > MAX_BODY_BYTES:
                return await _error(413, "request too large", "the decompressed body is too large")(
                    scope, receive, send
                )
            gzip.decompress(body)  # the whole stream must be valid, trailer included
        except (OSError, EOFError, zlib.error):
            return await _error(400, "invalid gzip body", "Content-Encoding says gzip but the body is not")(
                scope, receive, send
            )
        scope = {
            **scope,
            "headers": [
                (k, v)
                for k, v in scope["headers"]
                if k.lower() not in (b"content-encoding", b"content-length")
            ]
            + [(b"content-length", str(len(plain)).encode())],
        }
        sent_body = False

        async def replay() -> dict:
            nonlocal sent_body
            if sent_body:
                return await receive()
            sent_body = True
            return {"type": "http.request", "body": plain, "more_body": False}

        return await self.app(scope, replay, send)


api = FastAPI(
    title="icdray coder", version="2", description="ICD-10-CM codes with evidence for a discharge note."
)
api.add_middleware(Guard)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # pydantic's errors echo the submitted values (the note): return locations and messages only
    problems = [
        {"field": ".".join(str(x) for x in e["loc"][1:]) or "body", "problem": e["msg"]} for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in exc.errors()):
        return _error(400, "invalid JSON", problems)
    return _error(422, "invalid request", problems)


def _example(i: int) -> dict[str, Any]:
    from icdray import notes
    from icdray.demo_data import generate_chunk

    rows = generate_chunk(seed=11, first_patient=i % 50, n_patients=1, first_hadm=20_000_000)
    note = rows["discharge"][0]["text"]
    hadm = rows["discharge"][0]["hadm_id"]
    meds = sorted({r["drug"] for r in rows["prescriptions"] if r["hadm_id"] == hadm})
    gold = [
        r["icd_code"] for r in rows["diagnoses_icd"] if r["hadm_id"] == hadm and str(r["icd_version"]) == "10"
    ]
    patient = rows["patients"][0]
    return {
        "note": notes.prepare_note(note, max_tokens=1500).text,
        "medications": meds,
        "gold_codes": gold,
        "age": int(patient["anchor_age"]),
        "sex": patient["gender"],
    }


class Metrics:
    """The replica's counters on Ray's Prometheus endpoint (names prefixed icdray_)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        # valid="false": codes that are not billable ICD-10-CM (only unconstrained decoding can emit them)
        self.codes = metrics.Counter(
            "icdray_codes_emitted", description="codes returned by /v1/code", tag_keys=("valid",)
        )
        self.edits = metrics.Counter(
            "icdray_edits", description="coding edits raised", tag_keys=("rule", "severity")
        )
        self.feedback = metrics.Counter("icdray_feedback", description="coder actions", tag_keys=("action",))
        self.latency = metrics.Histogram(
            "icdray_code_latency_s",
            description="seconds to code one note",
            boundaries=[0.5, 1, 2, 5, 10, 20, 40, 80, 160],
        )


@serve.deployment(
    name="Coder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, health_check_period_s=10
)
@serve.ingress(api)
class Coder:
    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.engine: Any = None
        self.engine_key: Any = None
        self.tok: Any = None
        self.pieces: tuple[str, ...] = ()
        self.max_tokens = 0
        self.calibration: Any = None
        self.store: Any = None
        self.metrics = Metrics()
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0, "codes": 0, "invalid_codes": 0}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load (or reload) the model, the calibration and the feedback store from `user_config`."""
        from dataclasses import replace

        from icdray import chat, grammar, layout, models, storage
        from icdray.config import EngineConfig, from_dict
        from icdray.engine import AsyncVLLMEngine, bound_cores, cpu_bind, make_engine

        unknown = set(user_config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown user_config key(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        new = {**DEFAULTS, **user_config, "engine": {**DEFAULTS["engine"], **user_config.get("engine", {})}}
        engine_cfg = from_dict(EngineConfig, dict(new["engine"]), "engine")
        if engine_cfg.constrained and engine_cfg.backend != "vllm":
            raise ValueError(
                "constrained decoding needs engine.backend vllm (or set engine.constrained: false)"
            )
        if new["batching"] not in ("continuous", "static"):
            raise ValueError(f"batching must be continuous or static, got {new['batching']!r}")
        continuous = new["batching"] == "continuous" and engine_cfg.backend == "vllm"
        bounds = grammar.Bounds(new["max_reasoning_chars"], new["max_evidence_chars"], new["max_codes"])
        root = new["storage"]
        space = layout.label_space(root) if root else None
        constraint = grammar.constraint(space, bounds) if engine_cfg.constrained else None
        max_tokens = constraint.max_tokens if constraint else int(new["max_new_tokens"])
        bind = cpu_bind(engine_cfg.threads_bind)
        engine_cfg = replace(
            engine_cfg,
            threads=engine_cfg.threads or bound_cores(bind),
            threads_bind=bind,
            max_model_len=max(engine_cfg.max_model_len, int(new["max_prompt_tokens"]) + max_tokens + 16),
        )
        t = time.time()
        path = models.resolve(new["checkpoint"])
        key = (path, engine_cfg, constraint, continuous)
        if self.engine is None or key != self.engine_key:
            if hasattr(self.engine, "shutdown"):
                self.engine.shutdown()
            engine_type = AsyncVLLMEngine if continuous else None
            self.engine = (
                engine_type(path, engine_cfg, constraint)
                if engine_type
                else make_engine(path, engine_cfg, constraint)
            )
            self.engine_key = key
            self.tok = self.engine.tok
            self.pieces = chat.token_pieces(self.tok)
        self.max_tokens = max_tokens
        self.calibration = None
        if root and storage.exists(storage.join(layout.Layout(root).reports, "calibration.json")):
            from icdray import confidence

            data = storage.read_json(storage.join(layout.Layout(root).reports, "calibration.json"))
            self.calibration = confidence.Calibration.from_dict(data["calibration"])
        self.store = None
        if new["feedback_url"] or root:
            from icdray import feedback

            self.store = feedback.FeedbackStore(new["feedback_url"] or feedback.default_url(root))
        self.generate_batch.set_max_batch_size(int(new["max_batch_size"]))
        self.generate_batch.set_batch_wait_timeout_s(float(new["batch_wait_timeout_s"]))
        self.settings = {
            **new,
            "model_path": path,
            "constrained": constraint is not None,
            "max_tokens": max_tokens,
            "continuous": continuous,
        }
        log.info(
            "coder ready: %s (%s, %s batching, constrained=%s) in %.1fs",
            path,
            engine_cfg.backend,
            "continuous" if continuous else "static",
            constraint is not None,
            time.time() - t,
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, prompt_ids: list[list[int]]) -> list[Any]:
        from icdray.engine import SamplingSpec

        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(prompt_ids))
        spec = SamplingSpec(n=1, temperature=0.0, max_tokens=self.max_tokens)
        groups = await asyncio.to_thread(self.engine.generate, prompt_ids, spec)
        return [g[0] for g in groups]

    async def _generate(self, ids: list[int]) -> Any:
        from icdray.engine import SamplingSpec

        if not self.settings["continuous"]:
            return await self.generate_batch(ids)
        return await self.engine.generate_one(
            ids, SamplingSpec(n=1, temperature=0.0, max_tokens=self.max_tokens)
        )

    def _review(
        self, chart: list[str], age: int | None, sex: str | None
    ) -> tuple[list[Any], dict[str, Any] | None]:
        from icdray import drg, edits

        found = edits.edits(chart, age, sex)
        grouping = drg.group(chart, age, sex) if chart else None
        return found, grouping.to_dict() if grouping else None

    @api.post("/v1/code", response_model=CodeResponse)
    async def code(self, req: CodeRequest, request: Request) -> JSONResponse:
        from icdray import chat, coding

        t = time.time()
        rid = request.headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        ids = chat.encode_prompt(
            self.tok, req.note, req.medications or [], int(self.settings["max_prompt_tokens"])
        )
        sample = await self._generate(ids)
        chart = await asyncio.to_thread(
            coding.annotate,
            req.note,
            sample.text,
            sample.token_ids,
            sample.logprobs,
            self.pieces,
            self.calibration,
            req.age,
            req.sex,
        )
        out = [c.__dict__ for c in chart.codes]
        if self.store is not None:
            await asyncio.to_thread(
                self.store.record_request,
                rid,
                req.note,
                req.medications or [],
                out,
                self.settings["checkpoint"],
                req.age,
                req.sex,
            )
        invalid = sum(not c.valid for c in chart.codes)
        self.stats["requests"] += 1
        self.stats["codes"] += len(out)
        self.stats["invalid_codes"] += invalid
        for valid, n in (("true", len(out) - invalid), ("false", invalid)):
            if n:  # Ray's counters refuse an increment of 0
                self.metrics.codes.inc(n, tags={"valid": valid})
        for e in chart.edits:
            self.metrics.edits.inc(1, tags={"rule": e["rule"], "severity": e["severity"]})
        self.metrics.latency.observe(time.time() - t)
        body = CodeResponse(
            request_id=rid,
            codes=[CodeOut(**c) for c in out],
            reasoning=chart.reasoning,
            edits=[EditOut(**e) for e in chart.edits],
            drg=chart.drg,
            auto_eligible=chart.auto_eligible,
            model=self.settings["checkpoint"],
            latency_ms=(time.time() - t) * 1000,
        )
        return JSONResponse(body.model_dump(), headers={"x-request-id": rid})

    @api.post("/v1/feedback", status_code=201)
    async def feedback(self, req: FeedbackRequest) -> JSONResponse:
        if self.store is None:
            return _error(503, "no feedback store", "serve with --set storage=DIR or a feedback_url")
        try:
            fid = await asyncio.to_thread(
                self.store.record, req.request_id, req.code, req.action, req.user, req.new_code
            )
        except LookupError as e:
            return _error(404, "unknown request_id", str(e))
        except ValueError as e:
            return _error(422, "invalid feedback", str(e))
        self.metrics.feedback.inc(1, tags={"action": req.action})
        return JSONResponse({"id": fid, "request_id": req.request_id}, status_code=201)

    @api.post("/v1/review")
    async def review(self, req: ReviewRequest) -> dict[str, Any]:
        """Edits and DRG of a chart as the coder has it now (accepted codes, the chosen principal first)."""
        from icdray import codes

        chart = [codes.normalize(c) for c in req.codes if codes.is_valid(c)]
        found, grouping = await asyncio.to_thread(self._review, chart, req.age, req.sex)
        return {"edits": [e.to_dict() for e in found], "drg": grouping}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok" if self.engine is not None else "loading"}

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        keep = (
            "checkpoint",
            "model_path",
            "engine",
            "batching",
            "constrained",
            "max_tokens",
            "max_batch_size",
            "batch_wait_timeout_s",
        )
        cal = self.calibration
        return {
            **{k: self.settings.get(k) for k in keep},
            "calibrated": cal is not None,
            "auto_threshold": cal.threshold if cal else None,
            "feedback_store": self.store is not None,
            "stats": dict(self.stats),
        }

    @api.get("/v1/example")
    async def example(self, i: int = 0) -> dict[str, Any]:
        """A synthetic demo note (never MIMIC text) for the page's "load example" button."""
        return _example(i)

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("model not loaded")


def build_app(user_config: dict[str, Any] | None = None, **options: Any) -> Any:
    """The app with a user_config (checkpoint, engine, batching...) and deployment options (num_replicas...)."""
    from icdray.engine import bound_cores

    config = {**DEFAULTS, **(user_config or {})}
    engine = {**DEFAULTS["engine"], **config["engine"]}
    if engine.get("device", "cpu") == "cpu":
        # the replica calls the engine from threads other than the one that built it; OpenMP's thread
        # count is per thread, so the process default (OMP_NUM_THREADS, Ray's CPU share otherwise) must
        # be the cores vLLM binds, or its CPU attention aborts ("thread_num 1 vs. 2")
        actor = dict(options.get("ray_actor_options") or {"num_cpus": 1})
        runtime_env = dict(actor.get("runtime_env") or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars.setdefault("OMP_NUM_THREADS", str(bound_cores(engine.get("threads_bind", "all"))))
        options = {
            **options,
            "ray_actor_options": {**actor, "runtime_env": {**runtime_env, "env_vars": env_vars}},
        }
    return Coder.options(user_config=config, **options).bind()


app = build_app(json.loads(os.environ.get("ICDRAY_SERVE_CONFIG", "{}")))
