"""Ray Serve app: the ICD-10-CM coder over HTTP, and the coder's web page at `/`.

    POST /v1/code {"note", "medications"?} --validate--> prompts.build_messages -> chat template
        --@serve.batch (requests of many clients -> one engine call)--> vLLM (grammar: billable codes only)
        --prompts.parse_answer--> codes + codes.describe/is_valid + evidence spans located in the note
    GET /healthz, GET /v1/model, GET /v1/example, GET / (the page), GET /docs and /openapi.json

`serve run serve_app/serve_config.yaml` for development, `serve deploy` for a cluster, or
`icdray serve --checkpoint PATH`. The checkpoint and every serving knob arrive in `user_config`, so a
`serve deploy` with a new config reloads the model without restarting replicas.

Privacy: the note is never logged (errors name the field, not its content), and the validation errors
returned to clients leave the submitted values out. Auth: when the environment variable named by
`ICDRAY_TOKEN_ENV` (default `ICDRAY_API_TOKEN`) is set in the replica, every /v1 route needs
`Authorization: Bearer <token>`.
Left out: streaming responses, per-client rate limits (put a gateway in front), multi-model routing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from ray import serve
from starlette.middleware.base import BaseHTTPMiddleware

log = logging.getLogger("ray.serve")
MAX_BODY_BYTES = 256 * 1024  # a long discharge note is ~30 KB; this leaves room and stops abuse
MAX_NOTE_CHARS = 100_000
PAGE = Path(__file__).with_name("static") / "index.html"
DEFAULTS: dict[str, Any] = {
    "checkpoint": "smollm2-135m",  # a checkpoint folder (checkpoints/grpo, checkpoints/sft) or a registry name
    "storage": "",  # the run's storage root: its label space (if restricted) and the feedback database
    # the engine's settings (config.EngineConfig): backend vllm|hf, dtype, device, constrained, ...
    "engine": {"backend": "vllm", "threads_bind": "auto", "threads": 1},
    "max_new_tokens": 512,  # free (unconstrained) answers; constrained ones get the grammar's own budget
    "max_prompt_tokens": 2048,
    # grammar bounds (grammar.Bounds): every constrained answer closes within Bounds.worst_case_tokens()
    "max_reasoning_chars": 300,
    "max_evidence_chars": 60,
    "max_codes": 25,
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.05,
}


class CodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: StrictStr = Field(min_length=1, max_length=MAX_NOTE_CHARS, description="discharge note text")
    medications: list[StrictStr] | None = Field(default=None, description="discharge medications")


class CodeOut(BaseModel):
    code: str
    description: str
    evidence: str
    evidence_span: list[int] | None = Field(description="[start, end) of the evidence in the submitted note")
    valid: bool


class CodeResponse(BaseModel):
    codes: list[CodeOut]
    reasoning: str
    model: str
    latency_ms: float


def _error(status: int, error: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class Guard(BaseHTTPMiddleware):
    """Size, content type and auth checks before a request reaches the model."""

    async def dispatch(self, request: Request, call_next: Any) -> Any:
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))  # without the route prefix
        if path.startswith("/v1/"):
            token = os.environ.get(os.environ.get("ICDRAY_TOKEN_ENV", "ICDRAY_API_TOKEN"), "")
            sent = request.headers.get("authorization", "")
            if token and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return _error(401, "unauthorized", "send Authorization: Bearer <token>")
        if request.method == "POST":
            size = request.headers.get("content-length")
            if size is None:
                return _error(411, "length required", "send a Content-Length header")
            if not size.isdigit() or int(size) > MAX_BODY_BYTES:
                return _error(413, "request too large", f"the body must be at most {MAX_BODY_BYTES} bytes")
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _error(415, "unsupported media type", "send Content-Type: application/json")
        return await call_next(request)


api = FastAPI(
    title="icdray coder",
    version="1",
    description="ICD-10-CM codes with evidence for a discharge note.",
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
    return {"note": notes.prepare_note(note, max_tokens=1500).text, "medications": meds, "gold_codes": gold}


@serve.deployment(
    name="Coder",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    health_check_period_s=10,
)
@serve.ingress(api)
class Coder:
    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.engine: Any = None
        self.engine_key: Any = None
        self.tok: Any = None
        self.max_tokens = 0
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0, "codes": 0, "invalid_codes": 0}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load (or reload) the model; called by Serve with the deployment's `user_config`."""
        from dataclasses import replace

        from icdray import grammar, layout, models
        from icdray.config import EngineConfig, from_dict
        from icdray.engine import cpu_bind, make_engine

        unknown = set(user_config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown user_config key(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        new = {**DEFAULTS, **user_config}
        engine_cfg = from_dict(EngineConfig, dict(new["engine"]), "engine")
        if engine_cfg.constrained and engine_cfg.backend != "vllm":
            raise ValueError(
                "constrained decoding needs engine.backend vllm (or set engine.constrained: false)"
            )
        bounds = grammar.Bounds(new["max_reasoning_chars"], new["max_evidence_chars"], new["max_codes"])
        space = layout.label_space(new["storage"]) if new["storage"] else None
        constraint = grammar.constraint(space, bounds) if engine_cfg.constrained else None
        max_tokens = constraint.max_tokens if constraint else int(new["max_new_tokens"])
        engine_cfg = replace(
            engine_cfg,
            threads_bind=cpu_bind(engine_cfg.threads_bind),
            max_model_len=max(engine_cfg.max_model_len, int(new["max_prompt_tokens"]) + max_tokens + 16),
        )
        t = time.time()
        path = models.resolve(new["checkpoint"])
        key = (path, engine_cfg, constraint)
        if self.engine is None or key != self.engine_key:
            self.engine = make_engine(path, engine_cfg, constraint)
            self.engine_key = key
            self.tok = self.engine.tok
        self.max_tokens = max_tokens
        self.generate_batch.set_max_batch_size(int(new["max_batch_size"]))
        self.generate_batch.set_batch_wait_timeout_s(float(new["batch_wait_timeout_s"]))
        self.settings = {
            **new,
            "model_path": path,
            "constrained": constraint is not None,
            "max_tokens": max_tokens,
        }
        log.info(
            "coder ready: %s (%s, constrained=%s) in %.1fs",
            path,
            engine_cfg.backend,
            constraint is not None,
            time.time() - t,
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, prompt_ids: list[list[int]]) -> list[str]:
        from icdray.engine import SamplingSpec

        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(prompt_ids))
        spec = SamplingSpec(n=1, temperature=0.0, max_tokens=self.max_tokens)
        groups = await asyncio.to_thread(self.engine.generate, prompt_ids, spec)
        return [g[0].text for g in groups]

    @api.post("/v1/code", response_model=CodeResponse)
    async def code(self, req: CodeRequest) -> CodeResponse:
        from icdray import chat, codes, evidence, prompts

        if not req.note.strip():
            raise RequestValidationError(
                [{"loc": ("body", "note"), "msg": "note is blank", "type": "value_error"}]
            )
        t = time.time()
        ids = chat.encode_prompt(
            self.tok, req.note, req.medications or [], int(self.settings["max_prompt_tokens"])
        )
        text = await self.generate_batch(ids)
        answer = prompts.parse_answer(text)
        out = []
        for item in answer.items:
            span = evidence.find_span(req.note, item.evidence) if item.evidence else None
            valid = codes.is_valid(item.code)
            out.append(
                CodeOut(
                    code=item.code,
                    description=(codes.describe(item.code) or "") if valid else "",
                    evidence=item.evidence or "",
                    evidence_span=[span.start, span.end] if span else None,
                    valid=valid,
                )
            )
        self.stats["requests"] += 1
        self.stats["codes"] += len(out)
        self.stats["invalid_codes"] += sum(not c.valid for c in out)
        return CodeResponse(
            codes=out,
            reasoning=answer.reasoning,
            model=self.settings["checkpoint"],
            latency_ms=(time.time() - t) * 1000,
        )

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok" if self.engine is not None else "loading"}

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        keep = (
            "checkpoint",
            "model_path",
            "engine",
            "constrained",
            "max_tokens",
            "max_batch_size",
            "batch_wait_timeout_s",
        )
        return {**{k: self.settings.get(k) for k in keep}, "stats": dict(self.stats)}

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
    return Coder.options(user_config={**DEFAULTS, **(user_config or {})}, **options).bind()


app = build_app(json.loads(os.environ.get("ICDRAY_SERVE_CONFIG", "{}")))
