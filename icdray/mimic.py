"""Readers for MIMIC-IV's real file layout (hosp/ and note/ CSVs, gzip), real or demo.

Columns are selected by name and read as strings, then validated here, so one malformed row
(a missing id, a code that is not a code) is counted and skipped instead of failing the whole
file. Every reader returns its table plus a `Counter` of dropped rows by reason.

Paths may be local or any pyarrow filesystem URI. Left out: the ICU module, labs (`labevents`),
procedures, and ICD-9 -> ICD-10 mapping (ICD-9 rows are counted and dropped).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from icdray import codes, storage

DIAGNOSES = "hosp/diagnoses_icd.csv.gz"
D_ICD = "hosp/d_icd_diagnoses.csv.gz"
PRESCRIPTIONS = "hosp/prescriptions.csv.gz"
ADMISSIONS = "hosp/admissions.csv.gz"
PATIENTS = "hosp/patients.csv.gz"
DISCHARGE = "note/discharge.csv.gz"
# Note text spans lines inside quoted fields (as in MIMIC-IV's own files).
PARSE = pacsv.ParseOptions(newlines_in_values=True)
MAX_MEDICATIONS = 60  # per admission, in order of first order; real admissions can have hundreds of orders


def read_csv(root: str, rel: str, columns: list[str]) -> pa.Table:
    """Read the named columns of a (gzipped) CSV as strings. Missing columns -> a clear error."""
    path = storage.join(root, rel)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path} not found: point --mimic at a MIMIC-IV root holding hosp/ and note/ "
            f"(or make demo data with `icdray demo-data --out DIR`)"
        )
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:  # compression detected from the .gz extension
        try:
            return pacsv.read_csv(
                f,
                parse_options=PARSE,
                convert_options=pacsv.ConvertOptions(
                    include_columns=columns,
                    column_types=dict.fromkeys(columns, pa.string()),
                    strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: cannot read columns {columns}: {e}") from e


def parse_ids(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """String ids -> int64, null where missing or not a number."""
    trimmed = pc.utf8_trim_whitespace(col)
    digits = pc.fill_null(pc.match_substring_regex(trimmed, r"^[0-9]{1,18}$"), False)
    return pc.cast(pc.if_else(digits, trimmed, pa.scalar(None, pa.string())), pa.int64())


def load_codebook(root: str) -> codes.Codebook:
    """Release ∪ MIMIC's own ICD-10 titles: codes valid when MIMIC was coded are not invalid (docs/data.md)."""
    t = read_csv(root, D_ICD, ["icd_code", "icd_version", "long_title"])
    t = t.filter(pc.equal(pc.utf8_trim_whitespace(t["icd_version"]), "10"))
    return codes.Codebook(dict(zip(t["icd_code"].to_pylist(), t["long_title"].to_pylist(), strict=True)))


@dataclass(frozen=True)
class Labels:
    table: pa.Table  # hadm_id int64, subject_id int64, codes list<string> (dotted, seq_num order, unique)
    dropped: Counter


def read_diagnoses(root: str, codebook: codes.Codebook) -> Labels:
    """Gold ICD-10 codes per admission, vectorised (real MIMIC-IV has ~5M diagnosis rows)."""
    t = read_csv(root, DIAGNOSES, ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"])
    hadm, subj, seq = parse_ids(t["hadm_id"]), parse_ids(t["subject_id"]), parse_ids(t["seq_num"])
    version = pc.utf8_trim_whitespace(t["icd_version"])
    raw = t["icd_code"]
    # a few thousand distinct ICD-10 spellings: normalise and check each once (ICD-9 rows are never checked)
    uniq = pc.unique(pc.drop_null(raw.filter(pc.fill_null(pc.equal(version, "10"), False))))
    norm = [codes.normalize(c) for c in uniq.to_pylist()]
    pos = pc.index_in(raw, value_set=uniq)
    code = pc.take(pa.array(norm, pa.string()), pos)
    valid = pc.fill_null(pc.take(pa.array([codebook.is_valid(c) for c in norm], pa.bool_()), pos), False)

    dropped: Counter = Counter()
    ok = pc.and_(pc.is_valid(hadm), pc.is_valid(subj))
    for reason, bad in (
        ("missing_id", pc.invert(ok)),
        ("icd9", pc.and_(ok, pc.equal(version, "9"))),
        ("bad_icd_version", pc.and_(ok, pc.invert(pc.is_in(version, pa.array(["9", "10"]))))),
        ("bad_code", pc.and_(ok, pc.and_(pc.equal(version, "10"), pc.invert(valid)))),
    ):
        dropped[reason] = pc.sum(pc.fill_null(bad, True) if reason == "bad_icd_version" else bad).as_py() or 0
    keep = pc.and_(ok, pc.and_(pc.fill_null(pc.equal(version, "10"), False), valid))
    rows = pa.table(
        {
            "hadm_id": hadm,
            "subject_id": subj,
            "seq_num": pc.fill_null(seq, 10**6),
            "code": code,
            "_row": pa.array(range(t.num_rows), pa.int64()),
        }
    ).filter(keep)
    # An admission belongs to one patient: rows naming another subject than the first are dropped.
    first = rows.sort_by("_row").group_by("hadm_id", use_threads=False).aggregate([("subject_id", "first")])
    rows = rows.join(first, "hadm_id")
    same = pc.equal(rows["subject_id"], rows["subject_id_first"])
    dropped["subject_mismatch"] = pc.sum(pc.invert(same)).as_py() or 0
    rows = rows.filter(same).sort_by(
        [("hadm_id", "ascending"), ("seq_num", "ascending"), ("_row", "ascending")]
    )
    rows = rows.append_column("_pos", pa.array(range(rows.num_rows), pa.int64()))
    # first occurrence of each (admission, code), then the codes in seq_num order per admission
    firsts = (
        rows.group_by(["hadm_id", "code"], use_threads=False).aggregate([("_pos", "min")]).sort_by("_pos_min")
    )
    dropped["duplicate_code"] = rows.num_rows - firsts.num_rows
    grouped = firsts.group_by("hadm_id", use_threads=False).aggregate([("code", "list")])
    subject = first["subject_id_first"].take(pc.index_in(grouped["hadm_id"], value_set=first["hadm_id"]))
    table = pa.table({"hadm_id": grouped["hadm_id"], "subject_id": subject, "codes": grouped["code_list"]})
    return Labels(table, +dropped)


def read_medications(root: str, max_n: int = MAX_MEDICATIONS) -> Labels:
    """hadm_id -> the first `max_n` unique drug names in order of first prescription (column `medications`)."""
    t = read_csv(root, PRESCRIPTIONS, ["hadm_id", "drug"])
    dropped: Counter = Counter()
    hadm = parse_ids(t["hadm_id"])
    drug = pc.utf8_trim_whitespace(t["drug"])
    ok_id = pc.is_valid(hadm)
    ok_drug = pc.and_(pc.is_valid(drug), pc.greater(pc.utf8_length(pc.fill_null(drug, "")), 0))
    dropped["missing_id"] = pc.sum(pc.invert(ok_id)).as_py() or 0
    dropped["empty_drug"] = pc.sum(pc.and_(ok_id, pc.invert(ok_drug))).as_py() or 0
    keep = pa.table({"hadm_id": hadm, "drug": drug}).filter(pc.and_(ok_id, ok_drug))
    grouped = keep.group_by("hadm_id", use_threads=False).aggregate([("drug", "distinct")])
    meds = pc.list_slice(grouped["drug_distinct"], 0, max_n)
    table = pa.table({"hadm_id": grouped["hadm_id"], "medications": meds})
    return Labels(table, +dropped)


NOTE_COLUMNS = ["note_id", "subject_id", "hadm_id", "text"]  # what prepare reads of note/discharge
