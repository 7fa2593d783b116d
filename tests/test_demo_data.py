"""The demo data must look like MIMIC-IV to the loaders and like real coding data to the models."""

import gzip
import hashlib
import re
from collections import Counter

import pandas as pd
import pytest

from icdray import codes
from icdray.demo_data import write_demo

COLUMNS = {
    "hosp/diagnoses_icd.csv.gz": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    "hosp/d_icd_diagnoses.csv.gz": ["icd_code", "icd_version", "long_title"],
    "hosp/prescriptions.csv.gz": [
        "subject_id",
        "hadm_id",
        "pharmacy_id",
        "poe_id",
        "poe_seq",
        "order_provider_id",
        "starttime",
        "stoptime",
        "drug_type",
        "drug",
        "formulary_drug_cd",
        "gsn",
        "ndc",
        "prod_strength",
        "form_rx",
        "dose_val_rx",
        "dose_unit_rx",
        "form_val_disp",
        "form_unit_disp",
        "doses_per_24_hrs",
        "route",
    ],
    "hosp/admissions.csv.gz": [
        "subject_id",
        "hadm_id",
        "admittime",
        "dischtime",
        "deathtime",
        "admission_type",
        "admit_provider_id",
        "admission_location",
        "discharge_location",
        "insurance",
        "language",
        "marital_status",
        "race",
        "edregtime",
        "edouttime",
        "hospital_expire_flag",
    ],
    "hosp/patients.csv.gz": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    "note/discharge.csv.gz": [
        "note_id",
        "subject_id",
        "hadm_id",
        "note_type",
        "note_seq",
        "charttime",
        "storetime",
        "text",
    ],
}


@pytest.fixture(scope="module")
def big_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo1500")
    write_demo(root, 1500, seed=3, progress=False)
    read = {k: pd.read_csv(root / k, dtype={"ndc": str, "gsn": str, "icd_code": str}) for k in COLUMNS}
    return root, read


def test_columns_and_types_match_mimic(big_demo):
    _, t = big_demo
    for name, cols in COLUMNS.items():
        assert list(t[name].columns) == cols, name
    dx = t["hosp/diagnoses_icd.csv.gz"]
    assert set(dx["icd_version"]) == {9, 10}
    assert not dx["icd_code"].str.contains(r"\.").any()  # MIMIC stores codes without dots
    rx = t["hosp/prescriptions.csv.gz"]
    assert rx["ndc"].str.fullmatch(r"\d{11}").all()  # ndc is a string with leading zeros kept
    notes = t["note/discharge.csv.gz"]
    assert notes["note_id"].str.fullmatch(r"\d+-DS-\d+").all()
    assert (notes["note_id"].str.split("-").str[0].astype(int) == notes["subject_id"]).all()
    assert len(notes) == 1500 and notes["hadm_id"].is_unique


def test_label_statistics_are_realistic(big_demo):
    _, t = big_demo
    dx = t["hosp/diagnoses_icd.csv.gz"]
    dx10 = dx[dx.icd_version == 10]
    per = dx10.groupby("hadm_id").size()
    assert 15 <= per.mean() <= 19 and per.min() >= 10 and per.max() <= 25
    freq = dx10["icd_code"].value_counts()
    assert len(freq) >= 500  # several hundred distinct codes
    assert (freq <= 2).mean() > 0.5  # long tail: most distinct codes are rare
    assert {"E785", "I2510"} <= set(freq.index[:5])  # HLD and CAD lead, as in MIMIC-IV
    dotted = [codes.normalize(c) for c in freq.index]
    assert all(codes.is_valid(c) and codes.is_billable(c) for c in dotted)
    principal = dx10[dx10.seq_num == 1]["icd_code"].value_counts()
    assert {"A419", "I5023"} <= set(principal.index[:6])  # acute principal diagnoses
    pairs = Counter()
    for _, g in dx10.groupby("hadm_id"):
        s = set(g.icd_code)
        pairs["E785+I2510"] += {"E785", "I2510"} <= s
        pairs["I2510"] += "I2510" in s
    assert pairs["E785+I2510"] / pairs["I2510"] > 0.6  # co-occurrence: CAD comes with HLD


def test_coding_rules_and_use_additional_code(big_demo):
    _, t = big_demo
    dx = t["hosp/diagnoses_icd.csv.gz"]
    sets = dx[dx.icd_version == 10].groupby("hadm_id")["icd_code"].apply(set)
    rx = t["hosp/prescriptions.csv.gz"].groupby("hadm_id")["drug"].apply(set)
    checked = 0
    for hadm, s in sets.items():
        assert not ({"I10", "I129"} <= s)  # HTN with CKD is coded as the combination, never both
        assert not ({"E119", "E1122"} <= s)
        if any(c.startswith("E11") for c in s) and "Insulin Glargine" in rx.get(hadm, set()):
            assert "Z794" in s  # E11.x "use additional code" for insulin use
            checked += 1
    assert checked > 20


def test_notes_match_labels_and_prescriptions(big_demo):
    _, t = big_demo
    notes = t["note/discharge.csv.gz"].set_index("hadm_id")["text"]
    rx = t["hosp/prescriptions.csv.gz"].groupby("hadm_id")["drug"].apply(set)
    dx = t["hosp/diagnoses_icd.csv.gz"]
    sets = dx[dx.icd_version == 10].groupby("hadm_id")["icd_code"].apply(set)
    for heading in (
        "Chief Complaint:",
        "History of Present Illness:",
        "Brief Hospital Course:",
        "Discharge Medications:",
        "Discharge Diagnosis:",
        "Family History:",
    ):
        assert notes.str.contains(heading, regex=False).all(), heading
    assert notes.str.contains("___", regex=False).all()
    assert notes.str.contains(r"\b(?:HTN|HLD|CAD|AKI|AFib|CKD|COPD|DM2|GERD|OSA)\b").mean() > 0.5
    for hadm, text in notes.head(300).items():
        meds_section = text.split("Medications on Admission:")[1].split("Discharge Medications:")[0]
        lines = re.findall(r"^\d+\. (.+)$", meds_section, re.M)
        for line in lines:  # every home medication in the note is a prescription row of the admission
            assert any(line.startswith(drug + " ") for drug in rx[hadm]), line
        if "CTA chest negative for PE." in text and hadm in sets:
            assert "I2699" not in sets[hadm]  # negated findings are never labels
        if "Mother with breast cancer." in text and hadm in sets:
            assert "Z853" not in sets[hadm] or "history of breast cancer" in text


def test_deterministic_under_seed(tmp_path):
    def digest(root):
        return {k: hashlib.sha256(gzip.open(root / k).read()).hexdigest() for k in COLUMNS}

    write_demo(tmp_path / "a", 120, seed=5, progress=False)
    write_demo(tmp_path / "b", 120, seed=5, progress=False)
    write_demo(tmp_path / "c", 120, seed=6, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert (tmp_path / "a/hosp/patients.csv.gz").read_bytes() == (
        tmp_path / "b/hosp/patients.csv.gz"
    ).read_bytes()
