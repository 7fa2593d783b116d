"""The artifact layout under one storage root: every path and model name a stage reads or writes.

    <root>/mimic-demo/{hosp,note}/          synthetic MIMIC-IV files (prepare.mimic: demo)
    <root>/prompts/{train,val,test}/        prepared notes (prepare)        _report.json  _dropped/  _label_space.json
    <root>/exemplars/part-*.parquet         teacher exemplars (distill)     _summary.json  _cache/  _outcomes/
    <root>/checkpoints/{sft,grpo}/          HF model folders (sft, grpo)    grpo/_state/step-N/  */metrics.jsonl
    <root>/checkpoints/_ray/                Ray Train runs (SFT checkpoints and resume)
    <root>/reports/<row>.json               one scored model per file       results.md  results.json  *.png
    <root>/feedback/feedback.sqlite         coders' accept/reject/edit records (Serve)

Stages ask a `Layout` for paths instead of joining strings, so moving an artifact is a one-line change.
The readers of shared artifacts (`read_split`, `read_exemplars`, `train_code_counts`, `label_space`)
live here too: a stage that needs another stage's output reads it through this module, never through
that stage's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from icdray import storage

SPLITS = ("train", "val", "test")
STAGE_PREFIX = {"base": "base-", "sft": "sft-", "grpo": "sft+grpo-"}  # report row name = prefix + model


@dataclass(frozen=True)
class Layout:
    root: str

    def _p(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # -- data
    @property
    def mimic_demo(self) -> str:
        return self._p("mimic-demo")

    def split(self, split: str) -> str:
        return self._p("prompts", split)

    @property
    def prompts(self) -> str:
        return self._p("prompts")

    @property
    def prepare_report(self) -> str:
        return self._p("prompts", "_report.json")

    @property
    def dropped(self) -> str:
        return self._p("prompts", "_dropped")

    @property
    def staging(self) -> str:
        return self._p("prompts", "_staging")

    @property
    def label_space_file(self) -> str:
        return self._p("prompts", "_label_space.json")

    # -- distillation
    @property
    def exemplars(self) -> str:
        return self._p("exemplars")

    @property
    def exemplars_summary(self) -> str:
        return self._p("exemplars", "_summary.json")

    # -- training
    def checkpoint(self, stage: str) -> str:
        """`sft` or `grpo`: the stage's final HF model folder."""
        return self._p("checkpoints", stage)

    @property
    def ray_runs(self) -> str:
        return self._p("checkpoints", "_ray")

    @property
    def grpo_state(self) -> str:
        return self._p("checkpoints", "grpo", "_state")

    def metrics(self, stage: str) -> str:
        return self._p("checkpoints", stage, "metrics.jsonl")

    # -- evaluation and serving
    @property
    def reports(self) -> str:
        return self._p("reports")

    def report(self, name: str) -> str:
        return self._p("reports", f"{name}.json")

    def predictions(self, name: str) -> str:
        return self._p("reports", "predictions", f"{name}.jsonl")

    @property
    def feedback_db(self) -> str:
        return self._p("feedback", "feedback.sqlite")

    def done(self, stage: str) -> bool:
        """Whether a stage's artifact is complete (its last-written file exists)."""
        marker = {
            "prepare": self.prepare_report,
            "distill": self.exemplars_summary,
            "sft": storage.join(self.checkpoint("sft"), "config.json"),
            "grpo": storage.join(self.checkpoint("grpo"), "config.json"),
        }[stage]
        return storage.exists(marker)


def model_row(stage: str, model: str) -> str:
    """Report row name of a trained model: `base-smollm2-135m`, `sft-...`, `sft+grpo-...`."""
    return STAGE_PREFIX[stage] + model


def read_split(root: str, split: str, columns: list[str] | None = None) -> pa.Table:
    """One prepared split, sorted by hadm_id (so `limit` slices are deterministic)."""
    import pyarrow.dataset as pads

    where = Layout(root).split(split)
    fs, path = storage.resolve(where)
    if fs.get_file_info(path).type == 0:
        raise FileNotFoundError(f"{where} not found: run `icdray prepare --storage {root}` first")
    wanted = None if columns is None else list(dict.fromkeys(["hadm_id", *columns]))
    t = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=wanted).sort_by("hadm_id")
    return t if columns is None else t.select(columns)


def read_exemplars(root: str) -> pa.Table:
    """The kept teacher exemplars (what SFT trains on)."""
    import pyarrow.dataset as pads

    where = Layout(root).exemplars
    if not storage.exists(storage.join(where, "part-0.parquet")):
        raise FileNotFoundError(f"no exemplars under {where}: run `icdray distill --storage {root}` first")
    fs, path = storage.resolve(where)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def train_code_counts(root: str) -> dict[str, int]:
    """Code -> training admissions: what the rare/frequent buckets of every report are measured against."""
    from icdray import metrics

    return metrics.code_frequencies(read_split(root, "train", ["codes"])["codes"].to_pylist())


def label_space(root: str) -> list[str] | None:
    """The run's label space (codes in frequency order) when prepare restricted it, else None (all codes)."""
    path = Layout(root).label_space_file
    if not storage.exists(path):
        return None
    data: dict[str, Any] = storage.read_json(path)
    return list(data["codes"]) or None


def label_space_name(root: str) -> str:
    """How reports name the run's label space: `full`, or `top-50` for a top-k restriction."""
    path = Layout(root).label_space_file
    return f"top-{storage.read_json(path)['top_k']}" if storage.exists(path) else "full"
