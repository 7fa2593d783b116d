"""Batch coding as a user runs it (`python -m jobs.code`): a folder or a table of notes in, codes.parquet and
FHIR R4 bundles out, malformed rows counted and set aside; the FHIR export validated with fhir.resources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from icdray import batch, coding, fhir, layout, prepare
from icdray.config import PrepareConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "answer.max_codes=3",
    "answer.max_reasoning_chars=8",
    "answer.max_evidence_chars=12",
    "ray.num_cpus=2",
    "evaluate.cpus_per_worker=1",
    "evaluate.engine.kv_cache_gb=1",
]


def test_reading_notes_sets_malformed_rows_aside(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("Patient with HTN.")
    (folder / "b.txt").write_text("   \n")
    (folder / "c.txt").write_bytes(b"\xff\xfe not utf-8 \x80")
    (folder / "d.txt").write_text("NUL inside \x00 here")
    good, bad = batch.read_notes(str(folder))
    assert [r["id"] for r in good] == ["a"]
    assert {b["id"]: b["reason"] for b in bad} == {
        "b": "empty_note",
        "c": "not_utf8",
        "d": "control_characters",
    }
    table = pa.table({"hadm_id": [1, 2, 2, 3], "note": ["HTN.", None, "AKI.", "x" * 100_001]})
    pq.write_table(table, tmp_path / "notes.parquet")
    good, bad = batch.read_notes(str(tmp_path / "notes.parquet"))
    assert [r["id"] for r in good] == ["1", "2"]
    assert sorted(b["reason"] for b in bad) == ["not_text", "too_long"]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="`note` column"):
        batch.read_notes(str(tmp_path / "wrong.parquet"))


def test_fhir_bundle_is_valid_r4():
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.claim import Claim

    chart = coding.annotate(
        "HF and respiratory failure.",
        '<reasoning>\nx\n</reasoning>\n<answer>\n{"codes": [{"evidence": "HF", "code": "I50.23"}, '
        '{"evidence": "respiratory failure", "code": "J96.01"}]}\n</answer>',
        [],
        [],
        [],
        age=70,
        sex="M",
    )
    doc = fhir.bundle("chart-1", chart.to_dict(), "2026-12-01")
    Bundle.model_validate(doc)  # raises on any R4(B) violation
    claim = Claim.model_validate(doc["entry"][-1]["resource"])
    dx = claim.diagnosis
    assert [d.sequence for d in dx] == [1, 2]
    assert dx[0].diagnosisCodeableConcept.coding[0].code == "I50.23"
    assert [c.code for c in dx[0].type[0].coding] == ["principal", "principal"]
    assert dx[1].type[0].coding[0].code == "secondary"
    assert dx[0].packageCode.coding[0].code == "291"  # the MS-DRG the chart groups to
    bad = json.loads(json.dumps(doc))
    del bad["entry"][-1]["resource"]["patient"]
    with pytest.raises(ValueError):
        Bundle.model_validate(bad)


@pytest.mark.slow
def test_batch_job_writes_codes_and_fhir(ray_session, demo_root, tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    store = str(tmp_path / "store")
    prepare.run(PrepareConfig(max_note_tokens=200, top_k_codes=50), store, demo_root)
    test = layout.read_split(store, "test", ["hadm_id", "note", "medications"]).slice(0, 6)
    bad = [{"hadm_id": 1, "note": "", "medications": []}, {"hadm_id": 2, "note": "a\x00b", "medications": []}]
    rows = [*test.to_pylist(), *bad]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "worklist.parquet")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [
        sys.executable,
        "-m",
        "jobs.code",
        "--input",
        str(tmp_path / "worklist.parquet"),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--fhir",
        "--storage",
        store,
        *(x for s in SMALL for x in ("--set", s)),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 notes in, 6 coded" in proc.stdout and "1 control_characters, 1 empty_note" in proc.stdout
    coded = pq.read_table(out / "codes.parquet")
    assert coded["id"].to_pylist() == [
        str(h) for h in test["hadm_id"].to_pylist()
    ]  # input order, one row per note
    space = set(layout.label_space(store))
    for chart in coded.to_pylist():
        assert chart["codes"] and all(
            c["code"] in space and 0 <= c["confidence"] <= 1 for c in chart["codes"]
        )
        assert chart["codes"][0]["role"] == "principal" and chart["drg"] > 0
        note = next(r["note"] for r in rows if str(r["hadm_id"]) == chart["id"])
        for c in chart["codes"]:
            if c["evidence_start"] is not None:  # a span is where the quoted words are in this note
                found = note[c["evidence_start"] : c["evidence_end"]]
                assert " ".join(found.split()).lower() == " ".join(c["evidence"].split()).lower()
    skipped = pq.read_table(out / "_skipped.parquet").to_pylist()
    assert sorted(s["reason"] for s in skipped) == ["control_characters", "empty_note"]
    bundles = sorted((out / "fhir").glob("*.json"))
    assert len(bundles) == 6
    for b in bundles:
        Bundle.model_validate(json.loads(b.read_text()))


def test_a_code_is_supported_when_its_quote_is_in_the_note_and_it_clears_the_cut():
    from icdray import confidence

    text = (
        '<reasoning>\nx\n</reasoning>\n<answer>\n{"codes": [{"evidence": "HF", "code": "I50.23"}, '
        '{"evidence": "reflux", "code": "K21.9"}, {"evidence": "HTN", "code": "I10"}]}\n</answer>'
    )
    # one token per character, so each code's probability is its own characters' (and its closing quote's)
    pieces = sorted(set(text))
    ids = [pieces.index(ch) for ch in text]
    lps = [0.0] * len(text)
    at = text.index("I10") + 3  # the quote that closes I10 is unsure: p = 0.2
    lps[at] = -1.6094379
    chart = coding.annotate("HF and HTN.", text, ids, lps, pieces, confidence.Calibration([], cut=0.5))
    got = {c.code: c.supported for c in chart.codes}
    assert got == {"I50.23": True, "K21.9": False, "I10": False}  # reflux is not in the note; I10 is unsure
    assert all(c.supported is False or c.evidence_span for c in chart.codes)
    no_cut = coding.annotate("HF and HTN.", text, ids, lps, pieces)
    assert [c.supported for c in no_cut.codes] == [True, False, True]
