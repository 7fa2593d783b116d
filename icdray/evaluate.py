"""Evaluate any model on a prepared split: batch generation on Ray Data, parsed and scored.

    prompts/<split> --Ray Data map_batches(Coder actor pool: HF model, left-padded greedy generate)-->
        answers --prompts.parse_answer--> codes --metrics.score--> reports/<name>.json

The model is a registry name (smollm2-135m, tiny), an SFT/GRPO checkpoint folder, or a hub id.
Greedy decoding, so a score is reproducible. Left out: sampling-based self-consistency, vLLM (the
rollout stage brings it), constrained decoding (serving brings it).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import pyarrow as pa

from icdray import metrics, models, prepare, prompts, storage
from icdray.config import Config

log = logging.getLogger(__name__)


class Coder:
    """Ray Data actor holding one model; answers a batch of notes."""

    def __init__(self, model: str, max_new_tokens: int, batch_size: int, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.model, self.tok = models.load(model)
        self.model.eval()
        self.tok.padding_side = "left"  # generation continues from the right edge of every row
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def answer(self, notes: list[str], meds: list[list[str]]) -> tuple[list[str], list[int]]:
        import torch

        texts, lengths = [], []
        for lo in range(0, len(notes), self.batch_size):
            chats = [
                self.tok.apply_chat_template(
                    prompts.build_messages(n, m or []), add_generation_prompt=True, tokenize=False
                )
                for n, m in zip(
                    notes[lo : lo + self.batch_size], meds[lo : lo + self.batch_size], strict=True
                )
            ]
            enc = self.tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tok.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            for row in new:
                n = int((row != self.tok.pad_token_id).sum())
                texts.append(self.tok.decode(row, skip_special_tokens=True))
                lengths.append(n)
        return texts, lengths

    def __call__(self, batch: pa.Table) -> pa.Table:
        t = time.time()
        texts, lengths = self.answer(batch["note"].to_pylist(), batch["medications"].to_pylist())
        return pa.table(
            {
                "hadm_id": batch["hadm_id"],
                "answer": texts,
                "new_tokens": lengths,
                "seconds": [time.time() - t] * batch.num_rows,
            }
        )


def default_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1] if "/" in model else model)


def run(cfg: Config, model: str, out_dir: str = "", name: str = "") -> dict[str, Any]:
    """Generate, parse and score. Needs Ray initialised. Writes `<out_dir>/<name>.json`."""
    import ray

    ecfg = cfg.evaluate
    start = time.time()
    table = prepare.read_split(cfg.storage, ecfg.split, ["hadm_id", "note", "medications", "codes"])
    if ecfg.limit:
        table = table.slice(0, ecfg.limit)
    path = models.resolve(model)  # fail fast (and build a registry model once) before starting actors
    rows = max(1, ecfg.batch_size)
    ds = ray.data.from_arrow([table.slice(i, rows) for i in range(0, table.num_rows, rows)])
    ds = ds.map_batches(
        Coder,
        batch_format="pyarrow",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=ecfg.workers),
        num_cpus=ecfg.cpus_per_worker,
        fn_constructor_kwargs={
            "model": path,
            "max_new_tokens": ecfg.max_new_tokens,
            "batch_size": ecfg.batch_size,
            "threads": int(ecfg.cpus_per_worker),
        },
    )
    out = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("hadm_id")
    answers = dict(zip(out["hadm_id"].to_pylist(), out["answer"].to_pylist(), strict=True))
    parsed = [prompts.parse_answer(answers.get(h, "")) for h in table["hadm_id"].to_pylist()]
    gold = table["codes"].to_pylist()
    scores = metrics.score(
        [a.codes for a in parsed], gold, train_counts=prepare.train_code_counts(cfg.storage)
    )
    scores["format_ok_rate"] = sum(a.ok for a in parsed) / max(1, len(parsed))
    new_tokens = sum(out["new_tokens"].to_pylist())
    seconds = time.time() - start
    name = name or default_name(model)
    result = {
        "model": name,
        "model_path": path,
        "split": ecfg.split,
        "metrics": scores,
        "generated_tokens": new_tokens,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(new_tokens / max(1e-6, seconds), 1),
        "config": ecfg.__dict__,
        "examples": [
            {
                "hadm_id": h,
                "gold": g,
                "predicted": a.codes,
                "flags": sorted(a.flags),
                "answer": answers.get(h, "")[:2000],
            }
            for h, g, a in zip(table["hadm_id"].to_pylist()[:3], gold[:3], parsed[:3], strict=True)
        ],
    }
    storage.write_json(storage.join(out_dir or storage.join(cfg.storage, "reports"), f"{name}.json"), result)
    return result
