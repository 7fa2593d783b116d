"""`icdray` command line: one subcommand per pipeline stage, plus `pipeline` and `demo` (the main job).

Every command takes `--storage DIR` (the storage root: a folder or a pyarrow URI such as s3://bucket/x),
`--config FILE` (a profile: configs/demo.yaml, configs/gpu.yaml) and `--set key.sub=value` overrides on
top of the embedded defaults (the demo profile, see `icdray.config`). `python -m jobs.<stage>` runs
the same code, for `ray job submit`. A user error (missing input, bad setting) prints what to do and
exits 2; `-v` adds the full stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence

import yaml

from icdray import results
from icdray.config import Config, load_config

log = logging.getLogger("icdray")


def _common(p: argparse.ArgumentParser, storage: bool = True) -> None:
    if storage:
        p.add_argument("--storage", help="storage root: a folder or a pyarrow URI (default: artifacts)")
    p.add_argument(
        "--config", help="profile YAML (configs/demo.yaml is the default, configs/gpu.yaml for GPUs)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set prepare.max_note_tokens=2000 (repeatable)",
    )


def _load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    sets = [*extra, *args.overrides]
    if getattr(args, "storage", None):
        sets.insert(0, f"storage={args.storage}")
    return load_config(args.config, sets)


def _ray(cfg: Config, dashboard: bool = False) -> None:
    from dataclasses import replace

    from icdray.runtime import ensure_ray

    ensure_ray(replace(cfg.ray, dashboard=cfg.ray.dashboard or dashboard))


def cmd_demo_data(args: argparse.Namespace) -> int:
    from icdray.demo_data import write_demo

    t = time.time()
    counts = write_demo(args.out, args.admissions, seed=args.seed)
    print(
        f"wrote MIMIC-IV-shaped demo data to {args.out} in {time.time() - t:.1f}s: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from icdray import pipeline, prepare

    extra = [f"prepare.mimic={args.mimic}"] if args.mimic else []
    if args.keep_discharge_diagnosis:
        extra.append("prepare.keep_discharge_diagnosis=true")
    cfg = _load(args, extra)
    source = pipeline.mimic_root(cfg)
    if cfg.prepare.mimic != "demo":
        prepare.check_inputs(source)  # before Ray starts
    _ray(cfg)
    print(prepare.run(cfg.prepare, cfg.storage, source).format())
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from icdray import baseline, pipeline

    cfg = _load(args)
    rows = []
    for kind, name in pipeline.baseline_kinds(cfg).items():
        row = baseline.run(cfg.baseline, cfg.storage, kind)
        rows.append(row)
        print(f"{name}: {row.get('seconds', 0)}s; row in reports/{name}.json")
    print(results.table(rows))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from icdray import distill, layout, teacher

    extra = [f"teacher.backend={args.teacher}"] if args.teacher else []
    cfg = _load(args, extra)
    teacher.check_data_use(cfg.teacher)  # before Ray starts or any note is read
    _ray(cfg)
    if args.predict:
        result = distill.predict(cfg, split=args.split)
        print(results.table([result]))
        print(distill.Summary(**result["summary"]).format())
        return 0
    print(distill.run(cfg).format())
    print(f"exemplars in {layout.Layout(cfg.storage).exemplars}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from icdray import sft

    cfg = _load(args, [f"sft.model={args.model}"] if args.model else [])
    _ray(cfg, dashboard=True)
    print(sft.run(cfg).format())
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from icdray import grpo

    cfg = _load(args, [f"grpo.model={args.model}"] if args.model else [])
    _ray(cfg)
    print(grpo.run(cfg).format())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from icdray import evaluate

    cfg = _load(args)
    _ray(cfg)
    rows = []
    for model in args.model:
        got = evaluate.run(cfg, model, name=args.name if len(args.model) == 1 else "", role=args.role)
        rows += got["rows"]
        print(f"{model}: {got['generated_tokens']} tokens in {got['seconds']}s")
    print(results.table(rows))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a checkpoint over HTTP (the Ray Serve app in serve_app/) until interrupted."""
    from ray import serve

    from serve_app.app import build_app

    cfg = _load(args)
    _ray(cfg)
    user = {
        "checkpoint": os.path.abspath(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint,
        "storage": cfg.storage,
    }
    for item in args.option:
        key, _, raw = item.partition("=")
        user[key] = yaml.safe_load(raw)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(user, num_replicas=args.replicas), name="icdray", route_prefix="/", blocking=False)
    print(
        f"serving {args.checkpoint} at http://{args.host}:{args.port}/ (API: POST /v1/code, docs: /docs); Ctrl-C stops"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cmd_code(args: argparse.Namespace) -> int:
    """Code a worklist of notes (a folder of .txt files or a parquet/CSV table) into DIR/codes.parquet."""
    from icdray import batch

    cfg = _load(args)
    _ray(cfg)
    print(batch.run(cfg, args.input, args.out, model=args.model or "", fhir=args.fhir).format())
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    """`icdray feedback export`: the coders' reviewed charts as training data (the prepared-notes schema)."""
    from icdray import feedback, layout, storage

    cfg = _load(args)
    store = feedback.FeedbackStore(args.url or feedback.default_url(cfg.storage))
    out = args.out or storage.join(layout.Layout(cfg.storage).root, "feedback", "export", "reviewed.parquet")
    n = feedback.export(store, out)
    print(f"{n} reviewed charts -> {out}")
    print(f"train on them: icdray pipeline --storage DIR --set 'prepare.extra_train=[{out}]' --force")
    return 0


def cmd_submit(args: argparse.Namespace, rest: list[str]) -> int:
    """Submit `python -m jobs.<stage> ...` through the Ray Jobs API, stream its logs, return its status."""
    import asyncio
    import shlex
    from pathlib import Path

    from ray.job_submission import JobStatus, JobSubmissionClient

    root = Path(args.working_dir).resolve()
    if not (root / "jobs" / f"{args.stage}.py").exists():
        stages = sorted(p.stem for p in (root / "jobs").glob("*.py") if p.stem != "__init__")
        raise FileNotFoundError(f"no job jobs/{args.stage}.py under {root}; stages: {', '.join(stages)}")
    env = yaml.safe_load(Path(args.runtime_env).read_text()) if args.runtime_env else {}
    env = {**(env or {}), "working_dir": str(root)}
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265"
    client = JobSubmissionClient(address)
    entrypoint = f"python -m jobs.{args.stage} {shlex.join(rest)}".strip()
    for attempt in range(30):  # a cluster that just started may not have its job agent up yet
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == 29:
                raise
            time.sleep(2)
    print(f"submitted {job_id} to {address}: {entrypoint}", flush=True)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    if not args.no_wait:
        asyncio.run(tail())
    status = client.get_job_status(job_id)
    while not args.no_wait and not status.is_terminal():
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"\njob {job_id}: {status.value}", flush=True)
    return 0 if args.no_wait or status == JobStatus.SUCCEEDED else 1


def cmd_pipeline(args: argparse.Namespace, serve: bool = False) -> int:
    """`icdray pipeline` (every stage up to the report) and `icdray demo` (the same, then serving)."""
    from icdray import pipeline, teacher

    cfg = _load(args)
    if getattr(args, "plan", False):
        stages = pipeline.plan(cfg)
        print(json.dumps(pipeline.plan_json(stages), indent=2) if args.json else pipeline.format_plan(stages))
        return 0
    pipeline.mimic_root(cfg)  # a profile without data stops here, naming the key to set
    teacher.check_data_use(cfg.teacher)
    pipeline.run(cfg, force=args.force, serve_port=args.port if serve else 0, keep_serving=args.keep_serving)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return cmd_pipeline(args, serve=True)


def cmd_report(args: argparse.Namespace) -> int:
    from icdray import report

    cfg = _load(args)
    path = report.write(cfg.storage)
    print(report.markdown(cfg.storage))
    print(f"\nreport and plots in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="icdray", description="Train and serve LLM ICD-10-CM coders on Ray.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and full stack traces")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write MIMIC-IV-shaped demo files (hosp/, note/)")
    p.add_argument("--out", required=True, help="output folder (gets hosp/ and note/)")
    p.add_argument("--admissions", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo_data)

    p = sub.add_parser("prepare", help="MIMIC-IV files -> STORAGE/prompts/{train,val,test} (Ray Data)")
    p.add_argument("--mimic", help="MIMIC-IV root with hosp/ and note/, or 'demo' (sets prepare.mimic)")
    p.add_argument(
        "--keep-discharge-diagnosis",
        action="store_true",
        help="keep the leaky 'Discharge Diagnosis' section (only to compare with published benchmarks)",
    )
    _common(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("baseline", help="frequency prior, TF-IDF and encoder baselines, scored on test")
    _common(p)
    p.set_defaults(fn=cmd_baseline)

    p = sub.add_parser(
        "distill", help="teacher exemplars for the train split -> STORAGE/exemplars (Ray Data)"
    )
    p.add_argument("--teacher", choices=["reference", "gemini"], help="teacher backend (default: reference)")
    p.add_argument(
        "--predict",
        action="store_true",
        help="score the teacher as a predictor (no gold codes in the prompt) instead of distilling",
    )
    p.add_argument("--split", default="test", help="split for --predict (default test)")
    _common(p)
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser(
        "sft", help="fine-tune on the exemplars: Ray Train + DeepSpeed (+LoRA) -> checkpoints/sft"
    )
    p.add_argument("--model", help="tiny | smollm2-135m | HF folder | hub id (sets sft.model)")
    _common(p)
    p.set_defaults(fn=cmd_sft)

    p = sub.add_parser(
        "grpo",
        help="GRPO from the SFT model: vLLM rollout actors, reward actors, DeepSpeed learner -> checkpoints/grpo",
    )
    p.add_argument("--model", help="starting model (default: STORAGE/checkpoints/sft)")
    _common(p)
    p.set_defaults(fn=cmd_grpo)

    p = sub.add_parser("evaluate", help="generate, parse and score models on a prepared split (Ray Data)")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="registry name, checkpoint folder or hub id (repeat to compare models)",
    )
    p.add_argument("--name", help="report row name (single model only)")
    p.add_argument("--role", default="base", choices=["base", "sft", "grpo", "teacher"], help="row role")
    _common(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser(
        "submit",
        help="submit a stage (python -m jobs.<stage>) to a Ray cluster through the Jobs API and stream its logs",
    )
    p.add_argument("stage", help="prepare | distill | sft | grpo | evaluate | pipeline | ...")
    p.add_argument(
        "--address", help="Jobs API address (default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"
    )
    p.add_argument("--runtime-env", default="cluster/runtime_env.yaml", help="runtime env YAML ('' for none)")
    p.add_argument("--working-dir", default=".", help="repository root to upload (default .)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.set_defaults(fn=cmd_submit, passthrough=True)

    p = sub.add_parser("serve", help="serve a checkpoint with Ray Serve: HTTP API + coder page")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint folder (checkpoints/grpo, ...) or model name"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="serving option (user_config), e.g. --option max_batch_size=16 --option engine={backend: hf}",
    )
    _common(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "code", help="code a worklist of notes on Ray Data -> DIR/codes.parquet (and FHIR R4 bundles)"
    )
    p.add_argument(
        "--input", required=True, help="a folder of .txt notes, or a parquet/CSV with note and id columns"
    )
    p.add_argument("--out", required=True, help="output folder (codes.parquet, _skipped.parquet, fhir/)")
    p.add_argument(
        "--model", help="checkpoint folder or model name (default: STORAGE's SFT+GRPO or SFT model)"
    )
    p.add_argument("--fhir", action="store_true", help="also write one FHIR R4 Bundle per note to DIR/fhir/")
    _common(p)
    p.set_defaults(fn=cmd_code)

    p = sub.add_parser("feedback", help="coders' feedback: export reviewed charts as training data")
    p.add_argument("action", choices=["export"])
    p.add_argument("--url", help="feedback database URL (default: SQLite under STORAGE/feedback/)")
    p.add_argument("--out", help="parquet file to write (default: STORAGE/feedback/export/reviewed.parquet)")
    _common(p)
    p.set_defaults(fn=cmd_feedback)

    for name, fn, text in (
        ("demo", cmd_demo, "the main job: every stage as the profile says, then serve the trained model"),
        ("pipeline", cmd_pipeline, "every stage up to the report; stages whose artifacts exist are skipped"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--force", action="store_true", help="run every stage again, even when its artifacts exist"
        )
        p.add_argument(
            "--plan", action="store_true", help="print the stages, done/to do and their settings; run nothing"
        )
        p.add_argument("--json", action="store_true", help="with --plan: machine-readable")
        p.add_argument(
            "--port", type=int, default=8000, help="HTTP port of the served model (demo; default 8000)"
        )
        p.add_argument("--keep-serving", action="store_true", help="keep the coder page up after the demo")
        _common(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("report", help="reports/results.md, results.json and plots of every scored model")
    _common(p)
    p.set_defaults(fn=cmd_report)
    return ap


USER_ERRORS = (FileNotFoundError, ValueError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args, rest) if getattr(args, "passthrough", False) else args.fn(args)
    except USER_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (run with -v for the full stack trace)"
        print(f"icdray {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
