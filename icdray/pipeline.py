"""The whole pipeline in one run, exactly as the profile says:

    demo-data (only with prepare.mimic: demo) -> prepare -> distill -> baseline (prior, TF-IDF, encoder)
    -> sft -> grpo -> evaluate (base, SFT, SFT+GRPO) -> report (-> serve, in `icdray demo`)

A stage whose artifact already exists under the storage root is skipped (`--force` runs it again), so a
crashed or interrupted pipeline re-run picks up where it stopped: each stage resumes or reuses its own
checkpoints as well. Nothing here changes a stage's settings: the demo's scale is the demo profile's
(the config defaults, spelled out in configs/demo.yaml), a GPU run's is configs/gpu.yaml's.
`plan` lists every stage with done/to-do and the settings that decide its scale and placement.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, replace
from typing import Any

from icdray import layout, results, storage
from icdray.config import DEMO, Config
from icdray.layout import Layout


@dataclass(frozen=True)
class StagePlan:
    name: str
    done: bool
    settings: dict[str, Any]


def mimic_root(cfg: Config) -> str:
    """Where prepare reads MIMIC-IV files: the profile's root, or the synthetic files for `demo`."""
    if cfg.prepare.mimic == DEMO:
        return Layout(cfg.storage).mimic_demo
    if not cfg.prepare.mimic:
        raise ValueError(
            "prepare.mimic is not set: set it to your MIMIC-IV root (a folder holding hosp/ and note/), "
            "e.g. --set prepare.mimic=/data/mimic, or to 'demo' for synthetic notes"
        )
    return cfg.prepare.mimic


def baseline_kinds(cfg: Config) -> dict[str, str]:
    from icdray import baseline

    kinds = ["prior", "tfidf", *(["encoder"] if cfg.baseline.encoder else [])]
    return {k: baseline.NAMES[k] for k in kinds}


def trained_models(cfg: Config) -> list[tuple[str, str, str]]:
    """(role, model path or name, report row name) of the LLM rows: base, SFT, SFT+GRPO."""
    where = Layout(cfg.storage)
    short = cfg.sft.model.rstrip("/").split("/")[-1]
    return [
        ("base", cfg.sft.model, layout.model_row("base", short)),
        ("sft", where.checkpoint("sft"), layout.model_row("sft", short)),
        ("grpo", where.checkpoint("grpo"), layout.model_row("grpo", short)),
    ]


def _exported_sft(cfg: Config) -> bool:
    """The GRPO gate exported the SFT model unchanged (kept step 0, the same weights bit for bit)."""
    from icdray.training import folder_digest

    where = Layout(cfg.storage)
    meta = storage.join(where.checkpoint("grpo"), "icdray_grpo.json")
    return (
        storage.exists(meta)
        and storage.read_json(meta).get("kept_step") == 0
        and folder_digest(where.checkpoint("grpo")) == folder_digest(where.checkpoint("sft"))
    )


def _kept_start(cfg: Config, exported: bool | None = None) -> bool:
    """The GRPO gate exported the SFT model and the SFT row is scored on this profile's notes: the SFT+GRPO
    rows are then the SFT rows. `exported`: `_exported_sft(cfg)` when the caller has it (the digests read
    both checkpoints whole, downloads on object storage)."""
    if not _evaluated(cfg, trained_models(cfg)[1][2]):
        return False
    return _exported_sft(cfg) if exported is None else exported


def _evaluated(cfg: Config, row: str) -> bool:
    path = Layout(cfg.storage).report(row)
    return (
        storage.exists(path) and storage.read_json(path).get("config", {}).get("limit") == cfg.evaluate.limit
    )


def plan(cfg: Config) -> list[StagePlan]:
    """Every stage in order, whether its artifact is complete, and the settings that size and place it."""
    where, s, g, e, p = Layout(cfg.storage), cfg.sft, cfg.grpo, cfg.evaluate, cfg.prepare
    out: list[StagePlan] = []
    if p.mimic == DEMO:
        done = storage.exists(storage.join(where.mimic_demo, "note", "discharge.csv.gz"))
        out.append(
            StagePlan(
                "demo-data",
                done,
                {"admissions": p.demo_admissions, "seed": p.demo_seed, "output": where.mimic_demo},
            )
        )
    out.append(
        StagePlan(
            "prepare",
            where.done("prepare"),
            {
                "mimic": (where.mimic_demo if p.mimic == DEMO else p.mimic) or "(not set: prepare.mimic)",
                "label_space": f"top-{p.top_k_codes}" if p.top_k_codes else "full",
                "max_note_tokens": p.max_note_tokens,
                "keep_discharge_diagnosis": p.keep_discharge_diagnosis,
                "split_file": p.split_file,
                "output": where.prompts,
            },
        )
    )
    t = cfg.teacher
    out.append(
        StagePlan(
            "distill",
            where.done("distill"),
            {
                "teacher": t.backend,
                "model": t.model,
                "notes": t.limit or "all",
                "samples_per_note": t.samples_per_note,
                "workers": t.workers,
                "concurrency": t.concurrency,
                "output": where.exemplars,
            },
        )
    )
    kinds = baseline_kinds(cfg)
    out.append(
        StagePlan(
            "baseline",
            all(storage.exists(where.report(n)) for n in kinds.values()),
            {"models": list(kinds.values()), "output": where.reports},
        )
    )
    out.append(
        StagePlan(
            "sft",
            where.done("sft"),
            {
                "model": s.model,
                "lora": s.lora,
                "steps": s.max_steps or f"{s.epochs} epoch(s)",
                "epochs": s.epochs,
                "examples": s.limit or "all",
                "workers": s.num_workers,
                "gpus": s.num_workers if s.use_gpu else 0,
                "zero_stage": s.zero_stage,
                "lr": s.lr,
                "max_seq_len": s.max_seq_len,
                "dtype": s.dtype,
                "output": where.checkpoint("sft"),
            },
        )
    )
    out.append(
        StagePlan(
            "grpo",
            where.done("grpo"),
            {
                "model": g.model or where.checkpoint("sft"),
                "steps": g.steps,
                "prompts_per_step": g.prompts_per_step,
                "group_size": g.group_size,
                "engine": g.engine.backend,
                "constrained": g.engine.constrained,
                "rollout_workers": g.rollout_workers,
                "rollout_gpus": g.rollout_gpus,
                "learner_workers": g.learner_workers,
                "gpus": g.learner_workers * int(g.use_gpu) + g.rollout_workers * g.rollout_gpus,
                "lora": g.lora,
                "lr": g.lr,
                "output": where.checkpoint("grpo"),
            },
        )
    )
    rows = [r for _, _, r in trained_models(cfg)]
    out.append(
        StagePlan(
            "evaluate",
            all(_evaluated(cfg, r) for r in rows),
            {
                "models": rows,
                "notes": e.limit or "all",
                "split": e.split,
                "engine": e.engine.backend,
                "constrained": e.engine.constrained,
                "workers": e.workers,
                "gpus": e.workers * e.gpus_per_worker,
                "output": where.reports,
            },
        )
    )
    out.append(
        StagePlan(
            "calibrate",
            storage.exists(storage.join(where.reports, "calibration.json")),
            {
                "model": rows[-1],
                "notes": e.calibration_limit or "all",
                "split": "val",
                "output": storage.join(where.reports, "calibration.json"),
                "decision_rule_row": f"{rows[-1]}-supported",
            },
        )
    )
    out.append(
        StagePlan(
            "report",
            storage.exists(storage.join(where.reports, "results.json")),
            {"output": storage.join(where.reports, "results.md")},
        )
    )
    return out


def format_plan(stages: list[StagePlan]) -> str:
    lines = []
    for i, st in enumerate(stages, 1):
        lines.append(f"[{i}/{len(stages)}] {st.name:<10} {'done' if st.done else 'to do'}")
        lines += [f"      {k:<24} {v}" for k, v in st.settings.items()]
    return "\n".join(lines)


def plan_json(stages: list[StagePlan]) -> dict[str, Any]:
    return {
        "stages": [
            {"name": s.name, "status": "done" if s.done else "todo", "settings": s.settings} for s in stages
        ]
    }


def run(
    cfg: Config, force: bool = False, serve_port: int = 0, keep_serving: bool = False
) -> list[dict[str, Any]]:
    from icdray import baseline, distill, evaluate, grpo, prepare, report, sft
    from icdray.demo_data import write_demo
    from icdray.runtime import ensure_ray

    cfg = replace(cfg, ray=replace(cfg.ray, dashboard=True))  # Ray Train's State API polling needs it
    t0 = time.time()
    where = Layout(cfg.storage)
    source = mimic_root(cfg)  # a profile without MIMIC data stops here, before any work
    stages = plan(cfg)
    n = len(stages) + (1 if serve_port else 0)
    done = {st.name: st.done and not force for st in stages}
    k = 0

    def head(name: str, text: str) -> None:
        nonlocal k
        k += 1
        print(f"[{k}/{n}] {name}: {text} ({time.time() - t0:.0f}s)", flush=True)

    if cfg.prepare.mimic == DEMO:
        if done["demo-data"]:
            head("demo data", f"using {source}")
        else:
            head("demo data", f"{cfg.prepare.demo_admissions} synthetic admissions -> {source}")
            write_demo(source, cfg.prepare.demo_admissions, seed=cfg.prepare.demo_seed)
    ensure_ray(cfg.ray)
    if done["prepare"]:
        head("prepare", "prompts/ exists, skipped")
    else:
        head("prepare", f"{source} on Ray Data")
        print(prepare.run(cfg.prepare, cfg.storage, source).format())
    if done["distill"]:
        head("distill", "exemplars/ exists, skipped")
    else:
        head("distill", f"{cfg.teacher.backend} teacher on the train split (Ray Data)")
        print(distill.run(cfg).format())
    head("baseline", ", ".join(baseline_kinds(cfg).values()))
    for kind, name in baseline_kinds(cfg).items():
        if storage.exists(where.report(name)) and not force:
            print(f"  {name}: reports/{name}.json exists, skipped")
            continue
        row = baseline.run(cfg.baseline, cfg.storage, kind)
        print(f"  {name}: sample-F1 {row['sample_f1']:.3f} in {row.get('seconds', 0)}s")
    s = cfg.sft
    if done["sft"]:
        head("sft", "checkpoints/sft exists, skipped")
    else:
        head(
            "sft",
            f"{s.model}, {'LoRA' if s.lora else 'full'}, ZeRO-{s.zero_stage}, {s.num_workers} Ray Train "
            f"worker(s), {s.max_steps or 'all'} steps on {s.limit or 'all'} exemplars",
        )
        print(sft.run(cfg).format())
    g = cfg.grpo
    if done["grpo"]:
        head("grpo", "checkpoints/grpo exists, skipped")
    else:
        head(
            "grpo",
            f"{g.steps} steps x {g.prompts_per_step} notes x {g.group_size} answers from the SFT model",
        )
        if force:
            storage.delete_dir(
                where.checkpoint("grpo")
            )  # a forced run starts GRPO afresh instead of resuming
        print(grpo.run(cfg).format())
    head(
        "evaluate",
        f"base, SFT, SFT+GRPO on {cfg.evaluate.limit or 'all'} {cfg.evaluate.split} notes "
        f"({cfg.evaluate.engine.backend}, Ray Data)",
    )
    models = trained_models(cfg)
    final = models[-1][2]
    # the final model's test pass also decodes the calibration notes (one engine start fewer); when its rows
    # will be SFT's (the gate exported the SFT weights), SFT's pass decodes them for it
    exported = _exported_sft(cfg)  # the checkpoints stay as they are through evaluation: read them once
    sft_decodes = force or not _evaluated(cfg, models[1][2])
    cal_pass = models[1][2] if sft_decodes and exported else final
    fresh_cal = None
    for role, model, row in models:
        if _evaluated(cfg, row) and not force:
            print(f"  {row}: reports/{row}.json exists, skipped")
            continue
        if role == "grpo" and _kept_start(cfg, exported):
            why = "the GRPO gate kept step 0: its weights are the SFT model's, bit for bit"
            got_rows = evaluate.reuse(cfg, models[1][2], row, role, model, why)
            print(
                f"  {row}: {why}; rows copied from {models[1][2]} (sample-F1 {got_rows[0]['sample_f1']:.3f})"
            )
            continue
        with_cal = row == cal_pass and not done["calibrate"] and evaluate.constrained(cfg)
        got = evaluate.run(cfg, model, name=row, role=role, calibrate=with_cal, calibrate_as=final)
        fresh_cal = got.get("calibration")
        print(
            f"  {row}: "
            + ", ".join(f"{r['model']} sample-F1 {r['sample_f1']:.3f}" for r in got["rows"])
            + f"; {got['generated_tokens']} tokens in {got['seconds']}s"
        )
    role, model, row = models[-1]
    if fresh_cal is not None:
        where_from = "its" if cal_pass == row else f"{cal_pass}'s (the same weights)"
        head(
            "calibrate", f"{row} on {fresh_cal['notes']} validation notes, decoded in {where_from} test pass"
        )
    elif done["calibrate"]:
        head("calibrate", "reports/calibration.json exists, skipped")
    else:
        head(
            "calibrate", f"confidence of {row} on {cfg.evaluate.calibration_limit or 'all'} validation notes"
        )
        fresh_cal = evaluate.calibrate(cfg, model, row)
    if fresh_cal is not None:
        cal = fresh_cal["calibration"]
        print(
            f"  threshold {cal['threshold']:.2f}: precision {cal['precision_at_threshold']:.3f}, "
            f"coverage {cal['coverage_at_threshold']:.3f} of {cal['n_codes']} codes"
        )
    fitted = storage.read_json(storage.join(where.reports, "calibration.json"))
    if "rule" in fitted and storage.exists(where.predictions(row)):
        rule = fitted["rule"]
        got = evaluate.rule_row(cfg, row, role, rule["cut"], fitted["notes"])
        print(
            f"  decision rule (quote in the note, confidence >= {rule['cut']:.3f}): validation sample-F1 "
            f"{rule['val_sample_f1_as_written']:.3f} -> {rule['val_sample_f1']:.3f}; "
            f"{got['model']} sample-F1 {got['sample_f1']:.3f} on {cfg.evaluate.split}"
        )
    head("report", "reports/results.md, results.json, plots")
    report.write(cfg.storage)
    rows = results.collect(cfg.storage)
    print(results.table(rows))
    for c in results.comparisons(rows):
        print(
            f"  {c['a']} -> {c['b']}: {c['delta_sample_f1']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] (n={c['n']})"
        )
    if serve_port:
        head("serve", "the SFT+GRPO model on Ray Serve; code one test note over HTTP")
        serve_and_code_one(where.checkpoint("grpo"), cfg, serve_port, keep_serving)
    print(f"\nartifacts in {cfg.storage}; total {time.time() - t0:.0f}s")
    return rows


def serve_and_code_one(checkpoint: str, cfg: Config, port: int, keep: bool) -> dict[str, Any]:
    """Serve `checkpoint`, POST one test note to /v1/code, print the codes and the page's URL."""
    from ray import serve

    from serve_app.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"checkpoint": os.path.abspath(checkpoint), "storage": cfg.storage}),
        name="icdray",
        route_prefix="/",
        blocking=False,
    )
    url = f"http://127.0.0.1:{port}"
    row = layout.read_split(cfg.storage, "test", ["note", "medications", "codes"]).slice(0, 1).to_pylist()[0]
    body = json.dumps({"note": row["note"], "medications": row["medications"] or []}).encode()
    req = urllib.request.Request(url + "/v1/code", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    found = sum(c["code"] in row["codes"] for c in answer["codes"])
    print(
        f"POST {url}/v1/code -> {len(answer['codes'])} codes in {answer['latency_ms']:.0f} ms, "
        f"{found} of them among the {len(row['codes'])} gold codes"
    )
    for c in answer["codes"][:12]:
        hit = "gold" if c["code"] in row["codes"] else "    "
        where = f"at {c['evidence_span'][0]}" if c["evidence_span"] else "not in note"
        print(f"  {hit} {c['code']:<8} {c['description'][:56]:<56} evidence {c['evidence'][:36]!r} ({where})")
    print(f"coder page: {url}/   API docs: {url}/docs")
    if keep:
        print("serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    else:
        print(
            f"(the demo stops here; keep it up with --keep-serving, or: icdray serve --checkpoint {checkpoint})"
        )
    serve.shutdown()
    return answer
