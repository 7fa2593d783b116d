"""MIMIC-IV-shaped demo data: the six files `prepare` reads, generated locally and deterministically.

Users without MIMIC-IV credentials (and CI) run the exact code path of real data on these files.
What makes them realistic rather than a toy:
- patients with 1–4 admissions that keep their chronic conditions (so a patient-level split matters);
- an acute principal diagnosis (seq_num 1) with its typical secondary codes, chronic comorbidities
  with the co-occurrence of real data (HLD with hypothyroidism/CAD, CAD with stents, ...), real
  combination rules (HTN + CKD -> I12.9, + HF -> I13.0; DM2 + CKD -> E11.22; an exacerbation replaces
  the chronic code) and "use additional code" notes followed (E11.x on insulin -> Z79.4);
- a long tail of rare codes drawn from the ICD-10-CM release itself, worded from official
  descriptions and inclusion terms (most distinct codes occur only a few times);
- notes with MIMIC's real section headings, `___` de-identification placeholders, abbreviations,
  medications that match `prescriptions`, and distractors that are not labels (family history,
  negated findings, near misses), plus the leaky "Discharge Diagnosis:" section;
- a few ICD-9-coded admissions, as in real MIMIC-IV, which `prepare` must drop.

Each patient gets its own RNG seeded from (seed, patient index), so output does not depend on chunking.
Left out: procedures, labs/vitals tables, notes other than discharge summaries.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from icdray import codes
from icdray.demo_catalog import (
    APIXABAN,
    CHRONIC,
    CLOPID,
    FAMILY_HISTORY,
    GLARGINE,
    HOSPITAL_MEDS,
    METFORMIN,
    NEGATIONS,
    PRINCIPALS,
    STATUS,
    WARFARIN,
    Med,
    Principal,
)

CHRONIC_BY_KEY = {c.key: c for c in CHRONIC}
MIN_CODES, MAX_CODES = 10, 25
ICD9_SHARE = 0.03  # share of admissions coded in ICD-9 (pre-2015 in real MIMIC-IV)
ICD9_CODES = {
    "4019": "Unspecified essential hypertension",
    "2724": "Other and unspecified hyperlipidemia",
    "41401": "Coronary atherosclerosis of native coronary artery",
    "5849": "Acute kidney failure, unspecified",
    "0389": "Unspecified septicemia",
    "25000": "Diabetes mellitus without mention of complication",
    "42731": "Atrial fibrillation",
    "4280": "Congestive heart failure, unspecified",
    "2449": "Unspecified acquired hypothyroidism",
    "53081": "Esophageal reflux",
}
# Codes MIMIC-IV was coded with that later releases turned into categories (docs/data.md).
RETIRED = {"E87.2": "Acidosis", "N18.3": "Chronic kidney disease, stage 3 (moderate)", "R51": "Headache"}
CKD_STAGES = (
    ("N18.30", "CKD stage 3", 0.45),
    ("N18.31", "CKD stage 3a", 0.15),
    ("N18.32", "CKD stage 3b", 0.15),
    ("N18.4", "CKD stage 4", 0.15),
    ("N18.6", "ESRD on hemodialysis", 0.10),
)
INHOSPITAL = (
    ("E87.1", "hyponatremia", 0.08),
    ("E87.6", "hypokalemia", 0.1),
    ("E83.42", "hypomagnesemia", 0.07),
    ("D69.6", "thrombocytopenia", 0.06),
    ("E86.0", "dehydration", 0.05),
    ("D62", "acute blood loss anemia", 0.04),
)
_TAIL_LETTERS = set("DEFGHIJKLMNR")
_TAIL_SKIP = (
    "sequela",
    "encounter",
    "pregnan",
    "newborn",
    "child",
    "juvenile",
    "poisoning",
    "adverse",
    "underdosing",
    "in diseases classified elsewhere",
    "other specified",
    "radiation",
)


@functools.cache
def tail_pool(size: int = 5000) -> tuple[str, ...]:
    """Rare codes for the long tail: billable codes of common adult medicine chapters, in a fixed order."""
    pool = [
        c
        for c in codes.billable_codes()
        if c[0] in _TAIL_LETTERS
        and len(codes.describe(c) or "") <= 75
        and not any(s in (codes.describe(c) or "").lower() for s in _TAIL_SKIP)
    ]
    known = {c.code for c in CHRONIC} | {p.code for p in PRINCIPALS}
    pool = [c for c in pool if c not in known]
    random.Random(20240531).shuffle(pool)
    return tuple(pool[:size])


@functools.cache
def _tail_cum_weights(size: int) -> list[float]:
    # Zipf-like: the first few tail codes recur, most are seen once or twice.
    w = [1.0 / (i + 5) for i in range(size)]
    return [sum(w[: i + 1]) for i in range(size)]


def tail_wording(code: str, rng: random.Random) -> str:
    """Plain-language wording of a code, from an inclusion term or the official description."""
    terms = [t for t in codes.inclusion_terms(code) if len(t) < 70]
    text = rng.choice(terms) if terms and rng.random() < 0.4 else codes.describe(code) or code
    text = text.replace(" NOS", "").replace(", unspecified", "").replace("Unspecified ", "")
    return text[:1].lower() + text[1:] if not text[:2].isupper() else text


@functools.cache
def _additional(code: str) -> tuple[str, ...]:
    return tuple(codes.use_additional_codes(code))


def _follows_note(candidate: str, refs: tuple[str, ...]) -> bool:
    return any(candidate.startswith(r.rstrip("-")) if r.endswith("-") else candidate == r for r in refs)


@dataclass
class Patient:
    subject_id: int
    sex: str
    age: int
    chronic: dict[str, str]  # key -> wording used for this patient
    meds: list[Med]
    status: dict[str, str]  # status code -> wording
    ckd: tuple[str, str] | None = None
    bmi: float = 0.0
    burden: float = 1.0
    diabetes_meds: tuple[str, ...] = ()
    family: list[str] = field(default_factory=list)


def _make_patient(subject_id: int, rng: random.Random) -> Patient:
    sex = rng.choice("MF")
    age = min(91, max(40, int(rng.gauss(66, 13))))
    burden = rng.uniform(0.85, 2.0) * (1.15 if age >= 70 else 1.0)
    present: set[str] = set()
    for cond in CHRONIC:
        if (cond.sex and cond.sex != sex) or age < cond.min_age:
            continue
        if rng.random() < cond.prevalence * burden:
            present.add(cond.key)
    for cond in CHRONIC:  # co-occurrence: boosts from conditions already present
        if cond.key in present or (cond.sex and cond.sex != sex) or age < cond.min_age:
            continue
        boost = math.prod(m for k, m in cond.boosts if k in present)
        if boost > 1 and rng.random() < cond.prevalence * burden * (boost - 1):
            present.add(cond.key)
    for a, b in (("smoker", "former_smoker"), ("hf", "hfpef")):
        if a in present and b in present:
            present.discard(rng.choice((a, b)))
    return _furnish(Patient(subject_id, sex, age, {}, [], {}, burden=burden), present, rng)


def _furnish(p: Patient, present: set[str], rng: random.Random) -> Patient:
    """Wording, medications and status codes that follow from the patient's chronic conditions."""
    for key in sorted(present, key=list(CHRONIC_BY_KEY).index):
        cond = CHRONIC_BY_KEY[key]
        p.chronic[key] = rng.choice(cond.names)
        p.meds.extend(cond.meds)
    if "dm2" in present and not p.diabetes_meds:
        p.diabetes_meds = ("insulin",) if rng.random() < 0.4 else ("oral",)
        p.meds.append(GLARGINE if p.diabetes_meds == ("insulin",) else METFORMIN)
        p.status["Z79.4" if p.diabetes_meds == ("insulin",) else "Z79.84"] = (
            "on insulin" if p.diabetes_meds == ("insulin",) else "on metformin"
        )
    if "afib" in present and "Z79.01" not in p.status and rng.random() < 0.8:
        drug = APIXABAN if rng.random() < 0.7 else WARFARIN
        p.meds.append(drug)
        p.status["Z79.01"] = f"on {drug.drug.lower()}"
    if "cad" in present and "Z79.82" not in p.status:
        p.status["Z79.82"] = "on aspirin"
        for key, code, wording, chance in STATUS:
            if key == "cad" and rng.random() < chance:
                p.status[code] = wording
        if "Z95.5" in p.status and rng.random() < 0.5:
            p.meds.append(CLOPID)
            p.status["Z79.02"] = "on clopidogrel"
    if "obesity" in present and not p.bmi:
        p.bmi = round(rng.uniform(30.0, 44.9), 1)
        p.status[_bmi_code(p.bmi)] = f"BMI {p.bmi}"
    if "ckd" in present and p.ckd is None:
        r, acc = rng.random(), 0.0
        for code, wording, w in CKD_STAGES:
            acc += w
            if r < acc:
                p.ckd = (code, wording)
                break
        p.ckd = p.ckd or CKD_STAGES[0][:2]
        p.chronic["ckd"] = p.ckd[1]
        if p.ckd[0] == "N18.6":
            p.status["Z99.2"] = "on HD MWF via left arm AV fistula"
    if not p.family:
        p.family = rng.sample(FAMILY_HISTORY, k=rng.randint(1, 2))
    return p


def _bmi_code(bmi: float) -> str:
    if bmi >= 40:
        return "Z68.41"
    return f"Z68.{int(bmi)}"


@dataclass
class Admission:
    hadm_id: int
    codes: list[str]  # dotted, seq order
    principal: Principal
    mentions: dict[str, str]  # code -> wording used in the note
    course: list[str]
    inpatient_meds: list[Med]
    tail: list[str]
    icd9: bool = False


def _make_admission(p: Patient, hadm_id: int, rng: random.Random) -> Admission:
    principal = rng.choices(PRINCIPALS, weights=[x.weight for x in PRINCIPALS])[0]
    if principal.replaces and principal.replaces[0] not in p.chronic:
        _furnish(p, {*p.chronic, principal.replaces[0]}, rng)
    pname = rng.choice(principal.names)
    mentions: dict[str, str] = {principal.code: pname}
    course = [principal.course.format(name=pname)]
    for code, wording, chance in principal.extras:
        if rng.random() < chance and code not in mentions:
            mentions[code] = wording
            if not code.startswith(("Z", "I25")):  # status and chronic codes get no acute course line
                course.append(f"# {_cap(wording)}: monitored and treated, resolved by discharge.")
    for code, wording, chance in INHOSPITAL:
        if rng.random() < chance and code not in mentions:
            mentions[code] = wording
            course.append(f"# {_cap(wording)}: repleted/corrected, resolved by discharge.")

    chronic = {k: w for k, w in p.chronic.items() if k not in principal.replaces and rng.random() < 0.95}
    chronic_codes = {k: (p.ckd[0] if k == "ckd" and p.ckd else CHRONIC_BY_KEY[k].code) for k in chronic}
    hf_present = bool({"hf", "hfpef"} & set(chronic)) or principal.key == "hf"
    if "htn" in chronic and "ckd" in chronic:  # hypertensive CKD (and heart disease) combination codes
        esrd = chronic_codes["ckd"] == "N18.6"
        chronic_codes["htn"] = (
            ("I13.2" if esrd else "I13.0") if hf_present else ("I12.0" if esrd else "I12.9")
        )
    elif "htn" in chronic and hf_present:
        chronic_codes["htn"] = "I11.0"
    if "dm2" in chronic and "ckd" in chronic:
        chronic_codes["dm2"] = "E11.22"
    if principal.key == "dka":
        chronic_codes.pop("dm2", None)
    for key, code in chronic_codes.items():
        mentions.setdefault(code, chronic[key])
        cond = CHRONIC_BY_KEY[key]
        if cond.course and rng.random() < 0.6:
            course.append(cond.course.format(name=_cap(chronic[key]), bmi=p.bmi))
    for code, wording in p.status.items():
        if code not in mentions and rng.random() < 0.92:
            mentions[code] = wording
    # "use additional code" notes: status codes the record supports are required by the codes present
    for code in list(mentions):
        for status_code, wording in p.status.items():
            if status_code not in mentions and _follows_note(status_code, _additional(code)):
                mentions[status_code] = wording

    tail: list[str] = []
    pool, cum = tail_pool(), _tail_cum_weights(len(tail_pool()))
    n_tail = max(0, int(rng.gauss(5.5, 2.5)))
    while len(tail) < n_tail or len(mentions) + len(tail) < MIN_CODES:
        code = rng.choices(pool, cum_weights=cum)[0]
        if code not in mentions and code not in tail and code[:3] not in {c[:3] for c in mentions}:
            tail.append(code)
    for code in tail:
        mentions[code] = tail_wording(code, rng)
    # Over the cap: drop tail codes first, then the least specific status codes.
    order = [principal.code] + [c for c in mentions if c != principal.code]
    while len(order) > MAX_CODES:
        drop = next((c for c in reversed(order) if c in tail), None) or order[-1]
        order.remove(drop)
        mentions.pop(drop)
        if drop in tail:
            tail.remove(drop)
    inpatient = list(principal.meds) + rng.sample(HOSPITAL_MEDS, k=rng.randint(3, 6))
    return Admission(hadm_id, order, principal, mentions, course, inpatient, tail)


# ---------------------------------------------------------------------------------------------- notes


_STATUS_PREFIXES = ("Z79", "Z95", "Z99", "Z86", "Z85", "Z91")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _med_line(i: int, m: Med) -> str:
    return f"{i}. {m.drug} {m.dose} {m.unit} {m.route} {m.freq}"


def render_note(p: Patient, a: Admission, rng: random.Random) -> str:
    """A discharge summary in MIMIC-IV's layout: `Heading:` lines, `___` placeholders."""
    title = "Mr." if p.sex == "M" else "Ms."
    noun = "man" if p.sex == "M" else "woman"
    pmh_items = [
        a.mentions[c]
        for c in a.codes
        if c != a.principal.code
        and c in a.mentions
        and not c.startswith(("Z68", "Z88", "Z66", *_STATUS_PREFIXES))
    ]
    pmh_abbrev = ", ".join(pmh_items[:6]) or "no significant past medical history"
    allergy = (
        "Penicillins"
        if "Z88.0" in a.mentions
        else rng.choice(
            ("No Known Allergies / Adverse Drug Reactions", "Sulfa (Sulfonamide Antibiotics)", "lisinopril")
        )
    )
    smoking = (
        "Smokes 1 ppd, 40 pack-years."
        if "F17.210" in a.mentions
        else "Former smoker, quit 15 years ago."
        if "Z87.891" in a.mentions
        else "Never smoker."
    )
    negations = [s for code, s in NEGATIONS if code not in a.mentions]
    course = list(a.course)
    course += [
        f"# {_cap(a.mentions[c])}: stable, outpatient follow-up." for c in a.tail if rng.random() < 0.5
    ]
    if "Z66" in a.mentions:
        course.append("# Code status: DNR/DNI, confirmed with patient.")
    rng.shuffle(course[1:]) if len(course) > 2 else None
    course.insert(rng.randint(1, len(course)), " ".join(rng.sample(negations, k=min(2, len(negations)))))
    if a.principal.near_miss:
        course.insert(1, a.principal.near_miss)
    home = list(p.meds)
    discharge_meds = home + [m for m in a.inpatient_meds if m.route == "PO"][:2]
    secondary = [a.mentions[c] for c in a.codes[1:] if rng.random() < 0.6 and not c.startswith("Z")]
    status_words = [a.mentions[c] for c in a.codes if c.startswith(_STATUS_PREFIXES)]
    sections = [
        f"Name:  ___                     Unit No:   ___\n \nAdmission Date:  ___              Discharge Date:   ___\n \n"
        f"Date of Birth:  ___             Sex:   {p.sex}\n \nService: MEDICINE\n \nAllergies: \n{allergy}\n \n"
        f"Attending: ___.",
        f"Chief Complaint:\n{a.principal.complaint}",
        "Major Surgical or Invasive Procedure:\nNone",
        f"History of Present Illness:\n{title} ___ is a {p.age} y/o {noun} with PMH of {pmh_abbrev} who "
        f"{a.principal.hpi.format(name=a.mentions[a.principal.code])}. In the ED, initial vitals were T 98.9 HR 92 "
        f"BP 128/74 RR 18 SpO2 95% RA.",
        "Past Medical History:\n"
        + "\n".join(f"- {w}" for w in pmh_items)
        + ("\n- " + "\n- ".join(status_words) if status_words else ""),
        f"Social History:\n___\n{smoking} Lives with {rng.choice(('wife', 'husband', 'daughter', 'alone'))}.",
        "Family History:\n" + " ".join(p.family),
        f"Physical Exam:\nADMISSION PHYSICAL EXAM:\nVS: T 98.6 BP 132/78 HR 88 RR 18 O2 sat 96% RA"
        f"{f', BMI {p.bmi}' if p.bmi else ''}\nGENERAL: NAD, alert and oriented x3\nLUNGS: "
        f"{rng.choice(('CTAB', 'bibasilar crackles', 'scattered wheezes'))}\nEXTREMITIES: "
        f"{rng.choice(('no edema', '1+ pitting edema bilaterally', 'warm, well perfused'))}",
        f"Pertinent Results:\n___ 07:10AM BLOOD WBC-9.8 RBC-3.9 Hgb-11.2 Hct-34.1 Plt-212 {a.principal.labs}".rstrip(),
        f"Brief Hospital Course:\n{title} ___ is a {p.age} y/o {noun} admitted with "
        f"{a.mentions[a.principal.code]}.\n\nACUTE ISSUES:\n" + "\n".join(course),
        "Medications on Admission:\nThe Preadmission Medication list is accurate and complete.\n"
        + "\n".join(_med_line(i + 1, m) for i, m in enumerate(home)),
        "Discharge Medications:\n" + "\n".join(_med_line(i + 1, m) for i, m in enumerate(discharge_meds)),
        f"Discharge Disposition:\n{rng.choice(('Home', 'Home With Service', 'Extended Care'))}",
        "Discharge Diagnosis:\nPrimary:\n"
        + a.mentions[a.principal.code]
        + "\n\nSecondary:\n"
        + "\n".join(secondary),
        "Discharge Condition:\nMental Status: Clear and coherent.\nLevel of Consciousness: Alert and interactive.\n"
        "Activity Status: Ambulatory - Independent.",
        f"Discharge Instructions:\nDear {title} ___,\nYou were admitted to the hospital because of "
        f"{a.mentions[a.principal.code]}. Please take your medications as prescribed.\nWe wish you the best!\n"
        "Your ___ Care Team",
        "Followup Instructions:\n___",
    ]
    return " \n" + "\n \n".join(sections) + "\n"


# ------------------------------------------------------------------------------------------- tables


def _dt(rng: random.Random, year: int) -> pd.Timestamp:
    return pd.Timestamp(
        year=year,
        month=rng.randint(1, 12),
        day=rng.randint(1, 28),
        hour=rng.randint(0, 23),
        minute=rng.randint(0, 59),
    )


def _fmt(ts: pd.Timestamp) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S")


def generate_chunk(seed: int, first_patient: int, n_patients: int, first_hadm: int) -> dict[str, list[dict]]:
    """Rows of every table for patients [first_patient, first_patient + n_patients)."""
    rows: dict[str, list[dict]] = {
        k: [] for k in ("patients", "admissions", "diagnoses_icd", "prescriptions", "discharge")
    }
    hadm = first_hadm
    for idx in range(first_patient, first_patient + n_patients):
        rng = random.Random(f"{seed}:{idx}")
        subject_id = 10_000_000 + idx * 7 + 3
        p = _make_patient(subject_id, rng)
        year = rng.randint(2110, 2190)
        rows["patients"].append(
            {
                "subject_id": subject_id,
                "gender": p.sex,
                "anchor_age": p.age,
                "anchor_year": year,
                "anchor_year_group": rng.choice(("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019")),
                "dod": None,
            }
        )
        n_adm = rng.choices((1, 2, 3, 4), weights=(0.6, 0.22, 0.1, 0.08))[0]
        for seq in range(1, n_adm + 1):
            hadm += 1 + rng.randint(0, 40)
            a = _make_admission(p, hadm, rng)
            a.icd9 = rng.random() < ICD9_SHARE
            admit = _dt(rng, year + seq - 1)
            disch = admit + pd.Timedelta(hours=rng.randint(30, 240))
            rows["admissions"].append(
                {
                    "subject_id": subject_id,
                    "hadm_id": hadm,
                    "admittime": _fmt(admit),
                    "dischtime": _fmt(disch),
                    "deathtime": None,
                    "admission_type": rng.choice(("EW EMER.", "URGENT", "OBSERVATION ADMIT")),
                    "admit_provider_id": f"P{rng.randint(10000, 99999)}",
                    "admission_location": "EMERGENCY ROOM",
                    "discharge_location": rng.choice(
                        ("HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY")
                    ),
                    "insurance": rng.choice(("Medicare", "Medicaid", "Other")),
                    "language": "ENGLISH",
                    "marital_status": rng.choice(("MARRIED", "SINGLE", "WIDOWED", "DIVORCED")),
                    "race": rng.choice(
                        (
                            "WHITE",
                            "BLACK/AFRICAN AMERICAN",
                            "HISPANIC/LATINO - PUERTO RICAN",
                            "ASIAN",
                            "OTHER",
                        )
                    ),
                    "edregtime": _fmt(admit - pd.Timedelta(hours=4)),
                    "edouttime": _fmt(admit),
                    "hospital_expire_flag": 0,
                }
            )
            if a.icd9:
                icd9 = rng.sample(sorted(ICD9_CODES), k=rng.randint(3, 8))
                rows["diagnoses_icd"] += [
                    {
                        "subject_id": subject_id,
                        "hadm_id": hadm,
                        "seq_num": i + 1,
                        "icd_code": c,
                        "icd_version": 9,
                    }
                    for i, c in enumerate(icd9)
                ]
            else:
                rows["diagnoses_icd"] += [
                    {
                        "subject_id": subject_id,
                        "hadm_id": hadm,
                        "seq_num": i + 1,
                        "icd_code": codes.normalize(c).replace(".", ""),
                        "icd_version": 10,
                    }
                    for i, c in enumerate(a.codes)
                ]
            for i, m in enumerate([*p.meds, *a.inpatient_meds]):
                start = admit + pd.Timedelta(hours=rng.randint(1, 24))
                rows["prescriptions"].append(
                    {
                        "subject_id": subject_id,
                        "hadm_id": hadm,
                        "pharmacy_id": hadm * 100 + i,
                        "poe_id": f"{subject_id}-{hadm % 1000 + i}",
                        "poe_seq": hadm % 1000 + i,
                        "order_provider_id": f"P{rng.randint(10000, 99999)}",
                        "starttime": _fmt(start),
                        "stoptime": _fmt(disch),
                        "drug_type": "MAIN",
                        "drug": m.drug,
                        "formulary_drug_cd": m.drug.split()[0].upper()[:8] + m.dose,
                        "gsn": f"{zlib.crc32(m.drug.encode()) % 99999:06d}",
                        "ndc": f"{zlib.crc32((m.drug + m.dose).encode()) * 7 % 10**11:011d}",
                        "prod_strength": f"{m.dose}{m.unit} {m.form}",
                        "form_rx": None,
                        "dose_val_rx": m.dose,
                        "dose_unit_rx": m.unit,
                        "form_val_disp": "1",
                        "form_unit_disp": m.form,
                        "doses_per_24_hrs": 2.0 if "BID" in m.freq else 1.0,
                        "route": m.route,
                    }
                )
            rows["discharge"].append(
                {
                    "note_id": f"{subject_id}-DS-{seq}",
                    "subject_id": subject_id,
                    "hadm_id": hadm,
                    "note_type": "DS",
                    "note_seq": seq,
                    "charttime": _fmt(disch.normalize()),
                    "storetime": _fmt(disch + pd.Timedelta(hours=2)),
                    "text": render_note(p, a, rng),
                }
            )
    return rows


TABLES = {
    "patients": "hosp/patients.csv.gz",
    "admissions": "hosp/admissions.csv.gz",
    "diagnoses_icd": "hosp/diagnoses_icd.csv.gz",
    "prescriptions": "hosp/prescriptions.csv.gz",
    "discharge": "note/discharge.csv.gz",
}


def d_icd_diagnoses() -> pd.DataFrame:
    """Code titles as MIMIC ships them: ICD-10 without dots, plus retired codes and some ICD-9."""
    rows = [(c.replace(".", ""), 10, codes.describe(c)) for c in codes.billable_codes()]
    rows += [(c.replace(".", ""), 10, t) for c, t in RETIRED.items()]
    rows += [(c, 9, t) for c, t in ICD9_CODES.items()]
    return pd.DataFrame(rows, columns=["icd_code", "icd_version", "long_title"])


def _chunks(n_admissions: int, chunk_patients: int) -> Iterator[tuple[int, int]]:
    # ~1.66 admissions per patient: generate patients until the admission count is reached, then trim.
    first = 0
    n_patients = math.ceil(n_admissions / 1.5) + 10
    while first < n_patients:
        yield first, min(chunk_patients, n_patients - first)
        first += chunk_patients


def write_demo(
    out: str | Path, n_admissions: int, seed: int = 0, chunk_patients: int = 2000, progress: bool = True
) -> dict[str, int]:
    """Write the six MIMIC-IV files under `out`; returns row counts per table."""
    from tqdm import tqdm

    out = Path(out)
    (out / "hosp").mkdir(parents=True, exist_ok=True)
    (out / "note").mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(TABLES, 0)
    # mtime=0 keeps the gzip header, and so the files, byte-identical across runs with the same seed
    files = {
        k: io.TextIOWrapper(gzip.GzipFile(out / path, "wb", compresslevel=1, mtime=0), newline="")
        for k, path in TABLES.items()
    }
    hadm, done = 20_000_000, 0
    bar = tqdm(total=n_admissions, desc="demo admissions", unit="adm", disable=not progress)
    try:
        for first, n in _chunks(n_admissions, chunk_patients):
            rows = generate_chunk(seed, first, n, hadm + first * 200)
            keep_patients = []
            for adm in rows["admissions"]:
                if done >= n_admissions:
                    break
                done += 1
                keep_patients.append(adm["subject_id"])
            keep_hadm = {a["hadm_id"] for a in rows["admissions"][: len(keep_patients)]}
            keep_subj = set(keep_patients)
            for k, f in files.items():
                table = [
                    r
                    for r in rows[k]
                    if (r["subject_id"] in keep_subj if k == "patients" else r["hadm_id"] in keep_hadm)
                ]
                buf = io.StringIO()
                pd.DataFrame(table, columns=list(rows[k][0]) if rows[k] else None).to_csv(
                    buf, index=False, header=counts[k] == 0 and first == 0
                )
                f.write(buf.getvalue())
                counts[k] += len(table)
            bar.update(len(keep_hadm))
            if done >= n_admissions:
                break
    finally:
        bar.close()
        for f in files.values():
            f.close()
    titles = d_icd_diagnoses()
    titles.to_csv(
        out / "hosp/d_icd_diagnoses.csv.gz",
        index=False,
        compression={"method": "gzip", "compresslevel": 1, "mtime": 0},
    )
    counts["d_icd_diagnoses"] = len(titles)
    return counts
