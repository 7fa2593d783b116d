"""Clinical content for the demo-data generator: conditions, how notes word them, what treats them.

Each entry is hand-written from how MIMIC-IV discharge notes and their codes look (docs/data.md:
most frequent codes, strong pairs, acute principal diagnoses). Codes are checked against the bundled
ICD-10-CM release by the tests. The long tail of rare codes is not listed here: `demo_data` draws it
from the release itself, worded from official descriptions and inclusion terms.

Deliberately left out: procedures, ICD-9, pediatrics and obstetrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Med:
    drug: str  # as MIMIC's prescriptions.drug spells it
    dose: str  # dose_val_rx
    unit: str  # dose_unit_rx
    route: str
    freq: str  # as written in the note's medication lists
    form: str = "TAB"


@dataclass(frozen=True)
class Condition:
    key: str
    code: str
    names: tuple[str, ...]  # how notes word it: abbreviations first, then plain language
    prevalence: float = 0.0  # chance as a chronic comorbidity (before boosts)
    meds: tuple[Med, ...] = ()
    course: str = ""  # a Brief Hospital Course line, "{name}" is replaced by the wording used
    boosts: tuple[tuple[str, float], ...] = ()  # (other key, multiplier) when the other is present
    sex: str = ""  # "M"/"F" to restrict
    min_age: int = 0


def _m(drug: str, dose: str, unit: str, freq: str, route: str = "PO", form: str = "TAB") -> Med:
    return Med(drug, dose, unit, route, freq, form)


ATORVA = _m("Atorvastatin", "40", "mg", "QPM")
ASPIRIN = _m("Aspirin", "81", "mg", "DAILY")
CLOPID = _m("Clopidogrel", "75", "mg", "DAILY")
METFORMIN = _m("MetFORMIN (Glucophage)", "500", "mg", "BID")
GLARGINE = _m("Insulin Glargine", "20", "UNIT", "QHS", "SC", "VIAL")
APIXABAN = _m("Apixaban", "5", "mg", "BID")
WARFARIN = _m("Warfarin", "5", "mg", "DAILY")
FUROSEMIDE = _m("Furosemide", "40", "mg", "DAILY")

CHRONIC: tuple[Condition, ...] = (
    Condition(
        "hld",
        "E78.5",
        ("HLD", "hyperlipidemia", "dyslipidemia"),
        0.42,
        (ATORVA,),
        "# {name}: continued home atorvastatin.",
        (("cad", 1.6), ("dm2", 1.4), ("hypothyroid", 1.5)),
    ),
    Condition(
        "htn",
        "I10",
        ("HTN", "hypertension", "high blood pressure"),
        0.42,
        (_m("Lisinopril", "10", "mg", "DAILY"), _m("amLODIPine", "5", "mg", "DAILY")),
        "# {name}: home antihypertensives were held for soft BPs and restarted prior to discharge.",
        (("hld", 1.3), ("cad", 1.4), ("ckd", 1.5)),
    ),
    Condition(
        "cad",
        "I25.10",
        ("CAD", "coronary artery disease"),
        0.2,
        (ASPIRIN,),
        "# {name}: no chest pain this admission; continued aspirin and statin.",
        (("hld", 1.8), ("dm2", 1.4)),
    ),
    Condition(
        "dm2",
        "E11.9",
        ("DM2", "type 2 diabetes mellitus", "T2DM", "diabetes"),
        0.24,
        (),
        "# {name}: held home oral agents, covered with a humalog sliding scale; A1c 7.8%.",
        (("obesity", 1.8),),
    ),
    Condition(
        "hypothyroid",
        "E03.9",
        ("hypothyroidism",),
        0.14,
        (_m("Levothyroxine Sodium", "50", "mcg", "DAILY"),),
        "# {name}: continued home levothyroxine; TSH 2.1.",
    ),
    Condition(
        "depression",
        "F32.A",
        ("depression", "depressive disorder"),
        0.14,
        (_m("Sertraline", "50", "mg", "DAILY"),),
        "# {name}: mood stable, continued sertraline.",
    ),
    Condition(
        "anxiety",
        "F41.9",
        ("anxiety", "anxiety disorder"),
        0.12,
        (_m("BusPIRone", "10", "mg", "BID"),),
        "# {name}: continued buspirone.",
        (("depression", 2.0),),
    ),
    Condition(
        "afib",
        "I48.91",
        ("AFib", "atrial fibrillation", "Afib"),
        0.14,
        (_m("Metoprolol Succinate XL", "50", "mg", "DAILY"),),
        "# {name}: rate controlled on home metoprolol; CHA2DS2-VASc 4, anticoagulation continued.",
        (("htn", 1.3), ("hf", 2.0)),
    ),
    Condition("obesity", "E66.9", ("obesity",), 0.12, (), "# {name}: BMI {bmi}; nutrition consulted."),
    Condition(
        "copd",
        "J44.9",
        ("COPD", "chronic obstructive pulmonary disease"),
        0.1,
        (
            _m("Tiotropium Bromide", "1", "CAP", "DAILY", "IH", "CAP"),
            _m("Albuterol Inhaler", "2", "PUFF", "Q4H:PRN", "IH", "INHALER"),
        ),
        "# {name}: no exacerbation; continued home inhalers.",
        (("smoker", 2.5), ("former_smoker", 1.8)),
    ),
    Condition(
        "smoker",
        "F17.210",
        ("current smoker", "active tobacco use", "cigarette smoker"),
        0.12,
        (_m("Nicotine Patch", "14", "mg", "DAILY", "TD", "PATCH"),),
        "# Tobacco use: counseled on cessation, nicotine patch provided.",
    ),
    Condition("former_smoker", "Z87.891", ("former smoker", "history of tobacco use"), 0.22, (), ""),
    Condition(
        "gerd",
        "K21.9",
        ("GERD", "gastroesophageal reflux disease", "acid reflux"),
        0.17,
        (_m("Omeprazole", "20", "mg", "DAILY", form="CAP"),),
        "# {name}: continued home PPI.",
    ),
    Condition(
        "osa",
        "G47.33",
        ("OSA", "obstructive sleep apnea"),
        0.08,
        (),
        "# {name}: continued home CPAP overnight.",
        (("obesity", 3.0),),
    ),
    Condition(
        "gout",
        "M10.9",
        ("gout",),
        0.05,
        (_m("Allopurinol", "100", "mg", "DAILY"),),
        "# {name}: no flare; continued allopurinol.",
        (("ckd", 2.0),),
    ),
    Condition(
        "ckd",
        "N18.30",
        ("CKD stage 3", "chronic kidney disease stage 3", "CKD III"),
        0.13,
        (),
        "# {name}: creatinine at baseline 1.6 by discharge; renally dosed medications.",
        (("dm2", 1.8), ("htn", 1.6)),
    ),
    Condition(
        "hf",
        "I50.22",
        ("HFrEF", "chronic systolic heart failure", "chronic systolic CHF"),
        0.1,
        (FUROSEMIDE,),
        "# {name}: euvolemic on exam; continued home furosemide and carvedilol.",
        (("cad", 2.0), ("afib", 1.5)),
    ),
    Condition(
        "hfpef",
        "I50.32",
        ("HFpEF", "chronic diastolic heart failure", "chronic diastolic CHF"),
        0.05,
        (FUROSEMIDE,),
        "# {name}: euvolemic; continued home diuretic.",
        (("htn", 1.5),),
    ),
    Condition(
        "bph",
        "N40.0",
        ("BPH", "benign prostatic hyperplasia"),
        0.14,
        (_m("Tamsulosin", "0.4", "mg", "QHS", form="CAP"),),
        "# {name}: continued tamsulosin.",
        sex="M",
        min_age=50,
    ),
    Condition(
        "oa", "M19.90", ("osteoarthritis", "OA"), 0.06, (_m("Acetaminophen", "650", "mg", "Q6H:PRN"),), ""
    ),
    Condition(
        "vitd", "E55.9", ("vitamin D deficiency",), 0.06, (_m("Vitamin D", "1000", "UNIT", "DAILY"),), ""
    ),
    Condition(
        "anemia",
        "D64.9",
        ("anemia", "chronic anemia"),
        0.1,
        (),
        "# {name}: hemoglobin stable at baseline 10.2, no signs of bleeding.",
        (("ckd", 2.0),),
    ),
    Condition(
        "ida",
        "D50.9",
        ("iron deficiency anemia",),
        0.04,
        (_m("Ferrous Sulfate", "325", "mg", "DAILY"),),
        "# {name}: continued iron supplementation.",
    ),
    Condition(
        "pvd",
        "I73.9",
        ("PVD", "peripheral vascular disease"),
        0.04,
        (_m("Cilostazol", "100", "mg", "BID"),),
        "",
        (("smoker", 2.0), ("dm2", 1.5)),
    ),
    Condition(
        "hx_stroke", "Z86.73", ("history of stroke without residual deficits", "prior TIA"), 0.06, (), ""
    ),
    Condition(
        "dementia",
        "F03.90",
        ("dementia",),
        0.06,
        (_m("Donepezil", "5", "mg", "QHS"),),
        "# {name}: delirium precautions, reoriented frequently; at baseline per family.",
        min_age=70,
    ),
    Condition(
        "parkinson",
        "G20.A1",
        ("Parkinson's disease",),
        0.015,
        (_m("Carbidopa-Levodopa (25-100)", "1", "TAB", "TID"),),
        "# {name}: continued home Sinemet.",
        min_age=55,
    ),
    Condition(
        "chronic_pain",
        "G89.29",
        ("chronic pain", "chronic back pain"),
        0.05,
        (_m("OxyCODONE (Immediate Release)", "5", "mg", "Q6H:PRN"),),
        "# {name}: continued home regimen.",
    ),
    Condition("hx_dvt", "Z86.718", ("history of DVT", "prior DVT"), 0.04, (), ""),
    Condition(
        "osteoporosis",
        "M81.0",
        ("osteoporosis",),
        0.06,
        (_m("Alendronate Sodium", "70", "mg", "QWEEK"),),
        "",
        sex="F",
        min_age=55,
    ),
    Condition(
        "asthma",
        "J45.909",
        ("asthma",),
        0.06,
        (_m("Fluticasone Propionate 110mcg", "2", "PUFF", "BID", "IH", "INHALER"),),
        "",
    ),
    Condition("migraine", "G43.909", ("migraines", "migraine"), 0.03, (), ""),
    Condition(
        "glaucoma",
        "H40.9",
        ("glaucoma",),
        0.03,
        (_m("Latanoprost 0.005% Ophth. Soln.", "1", "DROP", "QHS", "BOTH EYES", "BOTTLE"),),
        "",
        min_age=50,
    ),
    Condition("insomnia", "G47.00", ("insomnia",), 0.04, (_m("TraZODone", "50", "mg", "QHS"),), ""),
    Condition("hx_breast_ca", "Z85.3", ("history of breast cancer s/p lumpectomy",), 0.04, (), "", sex="F"),
    Condition("pcn_allergy", "Z88.0", ("penicillin allergy",), 0.12, (), ""),
    Condition(
        "dnr",
        "Z66",
        ("DNR/DNI",),
        0.05,
        (),
        "# Code status: {name}, confirmed with patient and family.",
        min_age=70,
    ),
    Condition("falls", "Z91.81", ("history of falls", "recurrent falls"), 0.05, (), "", min_age=65),
)

# Conditions that also carry status codes: (condition key, code, wording, chance)
STATUS: tuple[tuple[str, str, str, float], ...] = (
    ("cad", "Z95.5", "s/p PCI with DES", 0.45),
    ("cad", "Z95.1", "s/p CABG", 0.15),
)


@dataclass(frozen=True)
class Principal:
    key: str
    code: str
    names: tuple[str, ...]
    weight: float
    complaint: str
    hpi: str  # "{name}" replaced with the wording used
    course: str
    meds: tuple[Med, ...] = ()  # inpatient treatment (prescriptions only)
    extras: tuple[tuple[str, str, float], ...] = ()  # (code, wording, chance) secondary acute codes
    labs: str = ""
    near_miss: str = ""  # wording that points at a sibling code that is NOT assigned
    # chronic keys this principal implies (the patient must have the first) and whose chronic code it
    # supersedes: an acute exacerbation is coded instead of the chronic code, not beside it
    replaces: tuple[str, ...] = field(default=())


_VANC = _m("Vancomycin", "1000", "mg", "Q12H", "IV", "VIAL")
_CTX = _m("CefTRIAXone", "1", "g", "Q24H", "IV", "VIAL")
_PIPTAZO = _m("Piperacillin-Tazobactam", "4.5", "g", "Q8H", "IV", "VIAL")
_HEPARIN = _m("Heparin", "5000", "UNIT", "Q8H", "SC", "VIAL")
_PANTO = _m("Pantoprazole", "40", "mg", "Q12H", "IV", "VIAL")

PRINCIPALS: tuple[Principal, ...] = (
    Principal(
        "sepsis",
        "A41.9",
        ("sepsis", "sepsis of unclear source"),
        0.13,
        "fever, hypotension",
        "presented with fevers, rigors and hypotension, meeting criteria for {name}",
        "# {name}: lactate 3.4 on arrival, started on broad-spectrum vancomycin and piperacillin-tazobactam "
        "after cultures; narrowed to ceftriaxone once the urinary source was identified.",
        (_VANC, _PIPTAZO, _CTX),
        (
            ("R65.20", "severe sepsis", 0.45),
            ("N39.0", "urinary tract infection", 0.5),
            ("B96.20", "E. coli in urine culture", 0.3),
            ("N17.9", "acute kidney injury", 0.35),
            ("G93.41", "metabolic encephalopathy", 0.15),
        ),
        "WBC-17.8* Lactate-3.4*",
        "Blood cultures with no growth to date; no evidence of endocarditis.",
    ),
    Principal(
        "nstemi",
        "I21.4",
        ("NSTEMI", "non-ST elevation myocardial infarction"),
        0.07,
        "chest pain",
        "developed substernal chest pain with troponin rise consistent with {name}",
        "# {name}: troponin peaked at 2.1, heparin gtt for 48 hours; cardiac catheterization with a drug-eluting "
        "stent to the LAD. Started on aspirin, clopidogrel and high-intensity atorvastatin.",
        (
            _m("Heparin", "1000", "UNIT/HR", "CONT", "IV", "BAG"),
            CLOPID,
            _m("Atorvastatin", "80", "mg", "QPM"),
        ),
        (
            ("I25.10", "coronary artery disease", 1.0),
            ("Z95.5", "s/p DES to LAD", 0.9),
            ("Z79.02", "on clopidogrel", 0.85),
        ),
        "Troponin T-2.1*",
        "ECG without ST elevations, so not a STEMI.",
    ),
    Principal(
        "aki",
        "N17.9",
        ("AKI", "acute kidney injury", "acute renal failure"),
        0.07,
        "weakness, poor PO intake",
        "was found to have a creatinine of 3.1 from a baseline of 1.0, concerning for {name}",
        "# {name}: likely prerenal in the setting of poor PO intake and diuretics; improved with IV fluids, "
        "creatinine 1.3 at discharge. Nephrotoxins held.",
        (_m("Sodium Chloride 0.9%", "1000", "mL", "ONCE", "IV", "BAG"),),
        (("E86.0", "dehydration", 0.4), ("E87.6", "hypokalemia", 0.2), ("E87.1", "hyponatremia", 0.2)),
        "Creat-3.1* BUN-58*",
        "Urine sediment without muddy brown casts, no evidence of ATN.",
    ),
    Principal(
        "resp_failure",
        "J96.01",
        ("acute hypoxic respiratory failure", "acute respiratory failure with hypoxia"),
        0.06,
        "shortness of breath",
        "was hypoxic to 82% on room air on arrival with {name}",
        "# {name}: required BiPAP briefly in the ED then weaned to nasal cannula; treated for pneumonia.",
        (_CTX, _m("Azithromycin", "500", "mg", "Q24H", "IV", "VIAL")),
        (("J18.9", "pneumonia", 0.7), ("J44.1", "COPD exacerbation", 0.25)),
        "pO2-54*",
        "VBG without hypercapnia.",
    ),
    Principal(
        "hf",
        "I50.23",
        ("acute on chronic systolic heart failure", "acute on chronic HFrEF", "CHF exacerbation"),
        0.09,
        "dyspnea on exertion, leg swelling",
        "presented with orthopnea, weight gain of 8 lbs and bilateral leg edema, consistent with {name}",
        "# {name}: EF 25% on TTE. Diuresed with IV furosemide, net negative 6 L, dry weight 82 kg. Continued "
        "carvedilol; discharged on torsemide.",
        (
            _m("Furosemide", "80", "mg", "BID", "IV", "VIAL"),
            _m("Torsemide", "40", "mg", "DAILY"),
            _m("Carvedilol", "12.5", "mg", "BID"),
        ),
        (("E87.6", "hypokalemia", 0.3), ("E83.42", "hypomagnesemia", 0.2)),
        "proBNP-8450*",
        "No evidence of diastolic dysfunction on echo.",
        ("hf", "hfpef"),
    ),
    Principal(
        "pneumonia",
        "J18.9",
        ("pneumonia", "community acquired pneumonia", "CAP"),
        0.09,
        "cough, fever",
        "presented with productive cough and fever with a right lower lobe consolidation, c/w {name}",
        "# {name}: treated with ceftriaxone and azithromycin, transitioned to oral cefpodoxime to complete a "
        "5 day course.",
        (
            _CTX,
            _m("Azithromycin", "500", "mg", "Q24H", "IV", "VIAL"),
            _m("Cefpodoxime Proxetil", "200", "mg", "Q12H"),
        ),
        (("E87.1", "hyponatremia", 0.2),),
        "WBC-14.2*",
        "Legionella urinary antigen negative.",
    ),
    Principal(
        "copd",
        "J44.1",
        ("COPD exacerbation", "acute exacerbation of COPD"),
        0.05,
        "shortness of breath",
        "presented with increased sputum and wheezing, c/w {name}",
        "# {name}: treated with prednisone 40 mg x5 days, azithromycin and standing nebulizers.",
        (
            _m("PredniSONE", "40", "mg", "DAILY"),
            _m("Ipratropium-Albuterol Neb", "1", "NEB", "Q6H", "IH", "NEB"),
        ),
        (("J96.01", "acute hypoxic respiratory failure", 0.2),),
        "",
        "No pneumonia on CXR.",
        ("copd",),
    ),
    Principal(
        "gib",
        "K92.2",
        ("GI bleed", "gastrointestinal hemorrhage", "upper GI bleed"),
        0.06,
        "melena",
        "reported several days of black tarry stools and was found to have a hemoglobin of 6.9, c/w {name}",
        "# {name}: transfused 2 units pRBC, IV pantoprazole BID; EGD showed a clean-based ulcer. Hemoglobin stable "
        "at 8.4 at discharge.",
        (_PANTO,),
        (("D62", "acute blood loss anemia", 0.85),),
        "Hgb-6.9*",
        "No evidence of variceal bleeding.",
    ),
    Principal(
        "uti",
        "N39.0",
        ("UTI", "urinary tract infection"),
        0.05,
        "dysuria, confusion",
        "was found to have a positive urinalysis and dysuria, c/w {name}",
        "# {name}: urine culture grew E. coli pan-sensitive; treated with ceftriaxone then oral cephalexin.",
        (_CTX, _m("Cephalexin", "500", "mg", "Q6H", form="CAP")),
        (("B96.20", "E. coli", 0.8),),
        "",
        "No evidence of pyelonephritis.",
    ),
    Principal(
        "cellulitis",
        "L03.115",
        ("right lower extremity cellulitis", "cellulitis of the right leg"),
        0.04,
        "right leg redness",
        "presented with spreading erythema of the right lower leg, c/w {name}",
        "# {name}: treated with IV vancomycin, transitioned to oral cephalexin with improving erythema.",
        (_VANC,),
        (),
        "",
        "Ultrasound without abscess; LENIs negative for DVT.",
    ),
    Principal(
        "dka",
        "E11.10",
        ("DKA", "diabetic ketoacidosis"),
        0.02,
        "nausea, vomiting",
        "presented with nausea and an anion gap of 24 with glucose 512, c/w {name} in the setting of T2DM",
        "# {name}: insulin drip and fluids per protocol, gap closed in 14 hours; transitioned to glargine.",
        (_m("Insulin", "1", "UNIT/HR", "CONT", "IV", "BAG"),),
        (("E87.6", "hypokalemia", 0.4),),
        "Glucose-512* AnGap-24*",
        "",
        ("dm2",),
    ),
    Principal(
        "stroke",
        "I63.9",
        ("acute ischemic stroke", "CVA", "stroke"),
        0.04,
        "left sided weakness",
        "presented with acute onset left arm weakness, MRI confirmed {name}",
        "# {name}: outside the tPA window; started aspirin and high-intensity statin; PT/OT recommended rehab.",
        (ASPIRIN, _m("Atorvastatin", "80", "mg", "QPM")),
        (("R47.01", "aphasia", 0.2),),
        "",
        "No hemorrhagic conversion on repeat CT.",
    ),
    Principal(
        "pe",
        "I26.99",
        ("pulmonary embolism", "PE", "acute PE"),
        0.03,
        "pleuritic chest pain",
        "was found to have a right lower lobe segmental {name} on CTA",
        "# {name}: no RV strain; heparin gtt then transitioned to apixaban for at least 3 months.",
        (_m("Heparin", "1000", "UNIT/HR", "CONT", "IV", "BAG"), APIXABAN),
        (("Z79.01", "on apixaban", 0.9),),
        "",
        "No evidence of acute cor pulmonale.",
    ),
    Principal(
        "pancreatitis",
        "K85.90",
        ("acute pancreatitis",),
        0.03,
        "epigastric pain",
        "presented with epigastric pain radiating to the back and lipase 2,400, c/w {name}",
        "# {name}: aggressive IV fluids, pain control, advanced diet as tolerated.",
        (),
        (),
        "Lipase-2400*",
        "No necrosis on CT.",
    ),
    Principal(
        "hyponatremia",
        "E87.1",
        ("hyponatremia", "symptomatic hyponatremia"),
        0.02,
        "confusion",
        "was found to have a sodium of 118, c/w {name}",
        "# {name}: fluid restriction, sodium 131 at discharge.",
        (),
        (),
        "Na-118*",
        "",
    ),
    Principal(
        "syncope",
        "R55",
        ("syncope", "syncopal episode"),
        0.03,
        "passed out",
        "had a witnessed {name} at home without prodrome",
        "# {name}: telemetry without arrhythmia, orthostatic vitals positive; likely orthostatic.",
        (),
        (),
        "",
        "No seizure activity reported.",
    ),
    Principal(
        "etoh",
        "F10.230",
        ("alcohol withdrawal", "EtOH withdrawal"),
        0.03,
        "tremors",
        "presented with tremor and diaphoresis 24 hours after his last drink, c/w {name}",
        "# {name}: CIWA scale with diazepam, thiamine and folate; no seizures or DTs.",
        (_m("Diazepam", "10", "mg", "Q4H:PRN"), _m("Thiamine", "100", "mg", "DAILY")),
        (),
        "",
        "",
    ),
    Principal(
        "hip_fx",
        "S72.001A",
        ("right hip fracture", "right femoral neck fracture"),
        0.03,
        "fall",
        "sustained a mechanical fall at home and was found to have a {name}",
        "# {name}: orthopedics performed hemiarthroplasty; weight bearing as tolerated, DVT ppx for 4 weeks.",
        (_m("Enoxaparin Sodium", "40", "mg", "DAILY", "SC", "SYR"),),
        # W19.XXXA is a real code: ICD-10-CM pads to the 7th character (A = initial encounter) with "X"
        (("W19.XXXA", "fall", 0.9), ("D62", "acute blood loss anemia", 0.4)),
        "",
        "",
    ),
    Principal(
        "cdiff",
        "A04.72",
        ("C. diff colitis", "C. difficile infection"),
        0.02,
        "diarrhea",
        "presented with profuse watery diarrhea after a recent antibiotic course, stool positive for {name}",
        "# {name}: treated with oral vancomycin for 10 days.",
        (_m("Vancomycin Oral Liquid", "125", "mg", "Q6H", form="SOLN"),),
        (("E86.0", "dehydration", 0.4),),
        "",
        "No toxic megacolon on imaging.",
    ),
    Principal(
        "sbo",
        "K56.609",
        ("small bowel obstruction", "SBO"),
        0.02,
        "abdominal pain, vomiting",
        "presented with obstipation and vomiting; CT showed {name}",
        "# {name}: managed conservatively with NGT decompression; resolved with return of bowel function.",
        (),
        (),
        "",
        "No evidence of strangulation.",
    ),
    Principal(
        "chest_pain",
        "R07.9",
        ("chest pain",),
        0.03,
        "chest pain",
        "presented with intermittent {name} at rest",
        "# {name}: troponins negative x3, stress test without ischemia; likely musculoskeletal.",
        (),
        (),
        "",
        "Troponins negative, no evidence of acute MI.",
    ),
    Principal(
        "diverticulitis",
        "K57.32",
        ("diverticulitis", "sigmoid diverticulitis"),
        0.02,
        "LLQ pain",
        "presented with left lower quadrant pain; CT showed uncomplicated {name}",
        "# {name}: IV ciprofloxacin and metronidazole, transitioned to oral antibiotics.",
        (_m("MetroNIDAZOLE", "500", "mg", "Q8H", "IV", "BAG"),),
        (),
        "",
        "No abscess or perforation.",
    ),
    Principal(
        "hypertensive_urgency",
        "I16.0",
        ("hypertensive urgency",),
        0.02,
        "headache",
        "presented with headache and BP 212/108 without end-organ damage, c/w {name}",
        "# {name}: uptitrated home antihypertensives, BP 150s/80s at discharge.",
        (_m("Labetalol", "200", "mg", "BID"),),
        (),
        "",
        "No evidence of hypertensive emergency.",
    ),
)

# Meds every inpatient gets in MIMIC prescriptions whatever the diagnoses: noise for code prediction.
HOSPITAL_MEDS: tuple[Med, ...] = (
    _m("Sodium Chloride 0.9%  Flush", "3-10", "mL", "Q8H:PRN", "IV", "SYR"),
    _m("Acetaminophen", "650", "mg", "Q6H:PRN"),
    _m("Docusate Sodium", "100", "mg", "BID", form="CAP"),
    _m("Senna", "8.6", "mg", "BID"),
    _m("Ondansetron", "4", "mg", "Q8H:PRN", "IV", "VIAL"),
    _m("Polyethylene Glycol", "17", "g", "DAILY:PRN", form="PWD"),
    _HEPARIN,
    _m("Bisacodyl", "10", "mg", "DAILY:PRN", "PR", "SUPP"),
    _m("Potassium Chloride", "20", "mEq", "ONCE", form="TAB SA"),
    _m("Magnesium Sulfate", "2", "g", "ONCE", "IV", "BAG"),
)

# Family history lines and negated findings: text that must not become a label.
FAMILY_HISTORY: tuple[str, ...] = (
    "Mother with breast cancer.",
    "Father died of MI at 62.",
    "Brother with type 1 diabetes.",
    "Sister with lupus.",
    "Father with colon cancer.",
    "Mother with Alzheimer's dementia.",
    "Family history of stroke in father.",
    "Noncontributory.",
    "Mother with hypothyroidism.",
    "Father with COPD, heavy smoker.",
)
NEGATIONS: tuple[tuple[str, str], ...] = (  # (code it might be confused with, sentence)
    ("I82.409", "LENIs without evidence of DVT."),
    ("I26.99", "CTA chest negative for PE."),
    ("A41.9", "Afebrile throughout without signs of sepsis."),
    ("J18.9", "CXR without focal consolidation to suggest pneumonia."),
    ("I21.4", "No evidence of ACS; troponins flat."),
    ("K92.2", "Guaiac negative, no signs of GI bleeding."),
    ("N39.0", "UA bland, no UTI."),
    ("I63.9", "Head CT without acute intracranial process; no stroke."),
    ("E11.9", "Denies history of diabetes; A1c 5.4%."),
    ("I48.91", "Telemetry without atrial fibrillation."),
    ("F32.A", "Denies depressed mood or SI."),
    ("C34.90", "Lung nodule previously biopsied, negative for malignancy."),
)
