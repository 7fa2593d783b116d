"""Prepare on Ray Data: corrupted rows are counted per reason and skipped, nothing else is lost."""

import gzip
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest

from icdray import layout, prepare
from icdray.config import PrepareConfig


def _rewrite(path: Path, df: pd.DataFrame) -> None:
    with gzip.open(path, "wt", newline="") as f:
        df.to_csv(f, index=False)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory, demo_root):
    """A copy of the demo data with known bad rows, and the counts `prepare` must report."""
    root = tmp_path_factory.mktemp("corrupted")
    shutil.copytree(demo_root, root, dirs_exist_ok=True)
    notes = pd.read_csv(root / "note/discharge.csv.gz", dtype=str, keep_default_na=False)
    dx = pd.read_csv(root / "hosp/diagnoses_icd.csv.gz", dtype=str, keep_default_na=False)
    icd9_hadm = set(dx.loc[dx.icd_version == "9", "hadm_id"])
    expected = {"no_icd10_codes": len(icd9_hadm & set(notes.hadm_id))}
    # notes: 3 with a missing hadm_id, 2 with a non-numeric subject_id, 4 empty, 1 whitespace only
    ok = notes[~notes.hadm_id.isin(icd9_hadm)].index
    notes.loc[ok[0:3], "hadm_id"] = ""
    notes.loc[ok[3:5], "subject_id"] = "abc"
    notes.loc[ok[5:9], "text"] = ""
    notes.loc[ok[9], "text"] = "   \n  "
    expected.update(missing_id=5, empty_note=5)
    # a note whose admission has diagnoses only with codes that do not exist -> no_icd10_codes
    victim = notes.loc[ok[10], "hadm_id"]
    n_victim = int((dx.hadm_id == victim).sum())
    dx.loc[dx.hadm_id == victim, "icd_code"] = "XYZ99"
    expected["no_icd10_codes"] += 1
    # diagnoses: 7 more bad codes elsewhere, 2 rows with missing ids
    other = dx[(dx.icd_version == "10") & (dx.hadm_id != victim) & (dx.seq_num != "1")].index
    dx.loc[other[:7], "icd_code"] = "NOTACODE"
    dx.loc[other[7:9], "hadm_id"] = ""
    dx_expected = {"bad_code": n_victim + 7, "missing_id": 2, "icd9": int((dx.icd_version == "9").sum())}
    _rewrite(root / "note/discharge.csv.gz", notes)
    _rewrite(root / "hosp/diagnoses_icd.csv.gz", dx)
    return str(root), expected, dx_expected, len(notes)


def test_counts_per_reason_and_nothing_else_lost(ray_session, corrupted, tmp_path):
    root, expected, dx_expected, n_notes = corrupted
    report = prepare.run(PrepareConfig(batch_size=64), str(tmp_path), root)
    assert report.dropped["discharge"] == expected
    assert report.dropped["diagnoses_icd"] == dx_expected
    assert report.notes_in == n_notes
    assert sum(report.kept.values()) == n_notes - sum(expected.values())
    dropped = pads.dataset(tmp_path / "prompts/_dropped").to_table()
    assert dropped.num_rows == sum(expected.values()) and "text" not in dropped.column_names
    splits = {s: layout.read_split(str(tmp_path), s) for s in layout.SPLITS}
    assert {s: t.num_rows for s, t in splits.items()} == report.kept
    # patient-level split: no patient in two splits
    subjects = {s: set(t["subject_id"].to_pylist()) for s, t in splits.items()}
    assert not (
        subjects["train"] & subjects["val"]
        or subjects["train"] & subjects["test"]
        or subjects["val"] & subjects["test"]
    )
    train = splits["train"]
    assert not any("Discharge Diagnosis" in n for n in train["note"].to_pylist())  # leakage removed
    assert all(codes and all("." in c or len(c) == 3 for c in codes) for codes in train["codes"].to_pylist())
    assert all(meds for meds in train["medications"].to_pylist())
    assert 0.7 < report.kept["train"] / sum(report.kept.values()) < 0.9


def test_ray_and_pandas_give_identical_output(ray_session, demo_root, tmp_path):
    cfg = PrepareConfig(batch_size=100, max_note_tokens=500)
    prepare.run(cfg, str(tmp_path / "ray"), demo_root)
    prepare.run_pandas(cfg, str(tmp_path / "pd"), demo_root)
    for split in layout.SPLITS:
        a = layout.read_split(str(tmp_path / "ray"), split)
        b = layout.read_split(str(tmp_path / "pd"), split)
        assert a.num_rows > 0 and a.select(b.column_names).equals(b)
    assert any(layout.read_split(str(tmp_path / "ray"), "train")["truncated"].to_pylist())


def test_keep_flag_split_file_and_uri_storage(ray_session, demo_root, tmp_path):
    notes = pd.read_csv(Path(demo_root) / "note/discharge.csv.gz", usecols=["hadm_id"])
    given = pd.DataFrame(
        {"hadm_id": notes.hadm_id, "split": ["test" if i % 2 else "train" for i in range(len(notes))]}
    )
    given.iloc[:5, 1] = "holdout"  # not a split name: counted, not silently assigned
    given.to_csv(tmp_path / "split.csv", index=False)
    cfg = PrepareConfig(keep_discharge_diagnosis=True, split_file=str(tmp_path / "split.csv"))
    report = prepare.run(cfg, f"file://{tmp_path}/store", demo_root)
    assert report.kept["val"] == 0 and report.kept["train"] > 0 and report.kept["test"] > 0
    assert report.dropped["discharge"]["not_in_split_file"] <= 5
    train = layout.read_split(f"file://{tmp_path}/store", "train")
    wanted = set(given.hadm_id[given.split == "train"])
    assert set(train["hadm_id"].to_pylist()) <= wanted
    assert all("Discharge Diagnosis:" in n for n in train["note"].to_pylist())


def test_missing_input_is_a_clear_error(ray_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="MIMIC-IV root"):
        prepare.run(PrepareConfig(), str(tmp_path / "out"), str(tmp_path / "nowhere"))


def test_top_k_label_space(ray_session, demo_root, tmp_path):
    from collections import Counter

    full = str(tmp_path / "full")
    prepare.run(PrepareConfig(top_k_codes=0), full, demo_root)
    counts = Counter(c for cs in layout.read_split(full, "train", ["codes"])["codes"].to_pylist() for c in cs)
    top = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    store = str(tmp_path / "top")
    report = prepare.run(PrepareConfig(top_k_codes=10), store, demo_root)
    assert report.label_space == "top-10" and layout.label_space_name(store) == "top-10"
    assert layout.label_space(store) == top  # the train split's 10 most frequent codes, in order
    kept, dropped = 0, report.dropped["discharge"].get("no_label_space_codes", 0)
    for split in layout.SPLITS:
        before = layout.read_split(full, split)
        after = layout.read_split(store, split)
        kept += after.num_rows
        by_id = dict(zip(before["hadm_id"].to_pylist(), before["codes"].to_pylist(), strict=True))
        for h, cs, all_cs in zip(
            after["hadm_id"].to_pylist(),
            after["codes"].to_pylist(),
            after["all_codes"].to_pylist(),
            strict=True,
        ):
            assert (
                all_cs == by_id[h] and cs == [c for c in by_id[h] if c in top] and cs
            )  # order kept, none empty
    # every admission is either kept with label-space codes or dropped with the reason
    assert kept + dropped == sum(layout.read_split(full, s).num_rows for s in layout.SPLITS)
    assert report.notes_in == sum(report.kept.values()) + sum(report.dropped["discharge"].values())
