"""The whole pipeline in one run: demo data -> prepare -> distill -> baseline -> SFT -> GRPO -> evaluate
-> report (-> serve, in `icdray demo`).

A stage whose artifact already exists under the storage root is skipped (`--force` runs it again), so a
crashed or interrupted pipeline re-run picks up where it stopped: each stage resumes or reuses its own
checkpoints as well. The LLM stages run at the scale of the `demo` config section (CPU-sized by default;
`configs/gpu.yaml` for a GPU cluster).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import urllib.request
from typing import Any

from icdray import metrics, storage
from icdray.config import Config

EVAL_COLUMNS = (*metrics.DEFAULT_COLUMNS, "format_ok_rate")
TABLE_COLUMNS = ("n", *EVAL_COLUMNS)
STAGES = 9


def _done(path: str, force: bool) -> bool:
    return not force and storage.exists(path)


def run(cfg: Config, force: bool = False, serve_port: int = 0, keep_serving: bool = False) -> dict[str, Any]:
    from icdray import baseline, controller, distill, evaluate, prepare, report, sft
    from icdray.demo_data import write_demo
    from icdray.runtime import ensure_ray

    cfg = dataclasses.replace(
        cfg, ray=dataclasses.replace(cfg.ray, dashboard=True)
    )  # training stages need it
    t0 = time.time()
    d = cfg.demo
    root = cfg.storage
    mimic_root = cfg.prepare.mimic or storage.join(root, "mimic-demo")
    n = STAGES if serve_port else STAGES - 1
    if _done(storage.join(mimic_root, "note", "discharge.csv.gz"), force) or cfg.prepare.mimic:
        print(f"[1/{n}] demo data: using {mimic_root}")
    else:
        print(f"[1/{n}] demo data: {d.admissions} admissions -> {mimic_root}")
        write_demo(mimic_root, d.admissions, seed=d.seed)
    ensure_ray(cfg.ray)
    if _done(storage.join(root, "prompts", "_report.json"), force):
        print(f"[2/{n}] prepare: prompts/ exists, skipped")
    else:
        print(f"[2/{n}] prepare on Ray Data")
        print(prepare.run(cfg.prepare, root, mimic_root).format())
    if _done(storage.join(root, "exemplars", "_summary.json"), force):
        print(f"[3/{n}] distill: exemplars/ exists, skipped")
    else:
        print(f"[3/{n}] distill: {cfg.teacher.backend} teacher on the train split (Ray Data)")
        print(distill.run(cfg).format())
    out = storage.join(root, "reports")
    baselines = {"tfidf": baseline.MODEL_NAME}
    if cfg.baseline.encoder:
        baselines["encoder"] = baseline.ENCODER_NAME
    for kind, name in baselines.items():
        if _done(storage.join(out, f"{name}.json"), force):
            print(f"[4/{n}] baseline: reports/{name}.json exists, skipped")
        else:
            what = "TF-IDF" if kind == "tfidf" else "all-MiniLM-L6-v2 sentence encoder"
            print(f"[4/{n}] baseline: {what} + one-vs-rest logistic regression")
            baseline.run(cfg.baseline, root, out, kind)

    demo_cfg = dataclasses.replace(
        cfg,
        sft=dataclasses.replace(
            cfg.sft, max_steps=d.sft_steps, limit=d.sft_examples, grad_accum=1, val_fraction=0.0
        ),
        evaluate=dataclasses.replace(cfg.evaluate, limit=d.eval_notes, max_new_tokens=d.eval_max_new_tokens),
    )
    sft_out = storage.join(root, "checkpoints", "sft")
    if _done(storage.join(sft_out, "config.json"), force):
        print(f"[5/{n}] sft: checkpoints/sft exists, skipped")
    else:
        print(
            f"[5/{n}] sft: {cfg.sft.model}, {'LoRA' if cfg.sft.lora else 'full'}, ZeRO-{cfg.sft.zero_stage}, "
            f"{cfg.sft.num_workers} Ray Train workers, {d.sft_steps} steps on {d.sft_examples} exemplars"
        )
        print(sft.run(demo_cfg).format())
    grpo_cfg = dataclasses.replace(
        demo_cfg,
        grpo=dataclasses.replace(
            cfg.grpo,
            model=sft_out,
            steps=d.grpo_steps,
            prompts_per_step=d.grpo_prompts,
            group_size=d.grpo_group,
            max_new_tokens=d.grpo_max_new_tokens,
            max_prompt_tokens=d.sft_max_seq_len,
            checkpoint_every=d.grpo_steps,
            val_every=d.grpo_steps,
            val_notes=d.eval_notes,
            val_max_new_tokens=d.grpo_max_new_tokens,
            learner_threads=2,  # phases alternate: the learner may use both cores while vLLM waits
        ),
    )
    grpo_out = storage.join(root, "checkpoints", "grpo")
    if _done(storage.join(grpo_out, "config.json"), force):
        print(f"[6/{n}] grpo: checkpoints/grpo exists, skipped")
    else:
        print(
            f"[6/{n}] grpo: {d.grpo_steps} steps x {d.grpo_prompts} notes x {d.grpo_group} answers from the SFT "
            f"model ({cfg.grpo.rollout_backend} rollout actor, reward actor, DeepSpeed learner actor)"
        )
        if force:
            storage.delete_dir(grpo_out)  # a forced run starts GRPO afresh instead of resuming
        print(controller.run(grpo_cfg).format())

    print(f"[7/{n}] evaluate base, SFT, SFT+GRPO on {d.eval_notes} test notes (Ray Data batch generation)")
    rows = {
        name: storage.read_json(storage.join(out, f"{name}.json"))["metrics"] for name in baselines.values()
    }
    for model, name in (
        (cfg.sft.model, f"base-{cfg.sft.model}"),
        (sft_out, f"sft-{cfg.sft.model}"),
        (grpo_out, f"sft+grpo-{cfg.sft.model}"),
    ):
        path = storage.join(out, f"{name}.json")
        if _done(path, force) and storage.read_json(path)["config"].get("limit") == d.eval_notes:
            result = storage.read_json(path)
            print(f"  {name}: reports/{name}.json exists, skipped")
        else:
            result = evaluate.run(demo_cfg, model, out_dir=out, name=name)
            print(f"  {name}: {result['generated_tokens']} tokens generated in {result['seconds']}s")
        rows[name] = result["metrics"]
    print(
        f"\nTest split (LLM rows: first {d.eval_notes} admissions; discharge diagnosis section "
        f"{'kept' if cfg.prepare.keep_discharge_diagnosis else 'removed'}):\n"
    )
    print(metrics.format_table(rows, TABLE_COLUMNS))
    print(f"[8/{n}] report -> {report.write(root)}")
    if serve_port:
        print(f"[9/{n}] serve the SFT+GRPO model with Ray Serve and code one test note over HTTP")
        serve_and_code_one(grpo_out, cfg, serve_port, keep_serving)
    print(f"\nartifacts in {root}; total {time.time() - t0:.0f}s")
    return rows


def serve_and_code_one(checkpoint: str, cfg: Config, port: int, keep: bool) -> dict[str, Any]:
    """Serve `checkpoint`, POST one test note to /v1/code, print the codes and the page's URL."""
    from ray import serve

    from icdray import prepare
    from serve_app.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # short reasoning so that the codes fit in the demo's token budget
    user = {
        "checkpoint": os.path.abspath(checkpoint),
        "max_new_tokens": cfg.demo.eval_max_new_tokens,
        "max_reasoning_chars": 600,
    }
    serve.run(build_app(user), name="icdray", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    row = prepare.read_split(cfg.storage, "test", ["note", "medications", "codes"]).slice(0, 1).to_pylist()[0]
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
