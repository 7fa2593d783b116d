"""Evidence: where in a note a code is documented, and whether a cited quote is really there.

Used by the reference teacher (to cite the note's own words for each gold code), by rewards (a
quote must occur in the note, not be invented) and by serving (to highlight the span). Matching is
case- and whitespace-insensitive, because models re-flow whitespace when they copy text.

Terms for a code come from the code system (official description, inclusion terms) plus a table of
the abbreviations and drug names clinicians write instead (HTN for I10, apixaban for Z79.01). The
table is keyed by code prefix, so it covers a category's children too.

Left out: negation detection (the note's author decides what is coded; negated findings are the
model's problem to learn), fuzzy spelling matches.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from icdray import codes

# prefix -> words clinicians use for it. Longest prefix wins; all matching prefixes contribute.
ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "I1": ("HTN", "hypertension", "high blood pressure"),
    "I11": ("heart failure", "CHF", "HFrEF", "HFpEF"),
    "I12": ("CKD", "chronic kidney disease", "ESRD"),
    "I13": ("CKD", "heart failure", "CHF", "HFrEF", "HFpEF"),
    "I16": ("hypertensive urgency",),
    "E78": ("HLD", "hyperlipidemia", "dyslipidemia", "hypercholesterolemia"),
    "I25.1": ("CAD", "coronary artery disease"),
    "I21": ("NSTEMI", "STEMI", "myocardial infarction", "MI"),
    "I48": ("AFib", "Afib", "atrial fibrillation", "AF"),
    "I50": ("CHF", "HFrEF", "HFpEF", "heart failure"),
    "I50.2": ("HFrEF", "systolic heart failure", "systolic CHF"),
    "I50.3": ("HFpEF", "diastolic heart failure", "diastolic CHF"),
    "I26": ("PE", "pulmonary embolism"),
    "I63": ("CVA", "stroke"),
    "I73.9": ("PVD", "PAD", "peripheral vascular disease"),
    "E11": ("DM2", "T2DM", "type 2 diabetes", "diabetes", "DM"),
    "E11.1": ("DKA", "diabetic ketoacidosis"),
    "E03": ("hypothyroidism",),
    "E66": ("obesity", "obese"),
    "E87.1": ("hyponatremia",),
    "E87.6": ("hypokalemia",),
    "E86": ("dehydration",),
    "E83.42": ("hypomagnesemia",),
    "E55": ("vitamin D deficiency",),
    "N17": ("AKI", "acute kidney injury", "acute renal failure", "ARF"),
    "N18": ("CKD", "chronic kidney disease", "ESRD"),
    "N39.0": ("UTI", "urinary tract infection"),
    "N40": ("BPH", "benign prostatic hyperplasia", "enlarged prostate"),
    "J44": ("COPD",),
    "J44.1": ("COPD exacerbation",),
    "J18": ("pneumonia", "PNA", "CAP"),
    "J45": ("asthma",),
    "J96.0": ("respiratory failure", "hypoxic respiratory failure"),
    "K21": ("GERD", "reflux"),
    "K92.2": ("GI bleed", "GIB", "gastrointestinal hemorrhage"),
    "K85": ("pancreatitis",),
    "K56": ("SBO", "bowel obstruction"),
    "K57": ("diverticulitis",),
    "A41": ("sepsis", "septicemia"),
    "A04.7": ("C. diff", "C. difficile", "Clostridium difficile"),
    "R65.2": ("severe sepsis", "septic shock"),
    "B96.2": ("E. coli",),
    "G47.33": ("OSA", "obstructive sleep apnea"),
    "G20": ("Parkinson",),
    "G93.4": ("encephalopathy",),
    "F03": ("dementia",),
    "F32": ("depression", "MDD"),
    "F41": ("anxiety",),
    "F10.2": ("alcohol withdrawal", "EtOH withdrawal", "alcohol dependence"),
    "F17.2": ("smoker", "tobacco use", "smokes", "ppd"),
    "D62": ("acute blood loss anemia", "ABLA"),
    "D64.9": ("anemia",),
    "D50": ("iron deficiency anemia",),
    "D69.6": ("thrombocytopenia",),
    "M10": ("gout",),
    "M19": ("osteoarthritis", "OA"),
    "M81": ("osteoporosis",),
    "R55": ("syncope", "syncopal"),
    "R07": ("chest pain",),
    "S72.0": ("hip fracture", "femoral neck fracture"),
    "W19": ("fall",),
    "L03.11": ("cellulitis",),
    "Z87.891": ("former smoker", "history of tobacco", "quit smoking"),
    "Z79.4": ("insulin", "glargine", "Lantus"),
    "Z79.84": ("metformin", "glipizide", "oral hypoglycemic"),
    "Z79.01": ("apixaban", "warfarin", "rivaroxaban", "Eliquis", "Coumadin", "anticoagulation"),
    "Z79.02": ("clopidogrel", "Plavix", "ticagrelor", "prasugrel"),
    "Z79.82": ("aspirin", "ASA"),
    "Z95.5": ("DES", "PCI", "stent"),
    "Z95.1": ("CABG",),
    "Z99.2": ("HD", "hemodialysis", "dialysis"),
    "Z68": ("BMI",),
    "Z88.0": ("Penicillin", "penicillin allergy"),
    "Z66": ("DNR",),
    "Z91.81": ("falls",),
    "G89": ("chronic pain", "chronic back pain"),
    "Z86.73": ("history of stroke", "prior TIA", "history of TIA"),
    "Z86.718": ("history of DVT", "prior DVT"),
    "Z85.3": ("history of breast cancer",),
}

_WS = re.compile(r"\s+")
_DROP = re.compile(r"\b(unspecified|NOS)\b|\([^)]*\)|\[[^\]]*\]|,\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    text: str  # the note's own characters in [start, end)


def _flexible(text: str) -> str:
    """Regex for `text` word by word, any run of whitespace between words (quotes get re-flowed)."""
    return r"\s+".join(re.escape(w) for w in text.split())


def _pattern(quote: str) -> re.Pattern[str] | None:
    return re.compile(_flexible(quote), re.IGNORECASE) if quote.split() else None


def find_span(note: str, quote: str) -> Span | None:
    """Where `quote` occurs in `note`, ignoring case and whitespace differences; None if it does not."""
    if not isinstance(note, str) or not isinstance(quote, str):
        return None
    pat = _pattern(quote.strip().strip('"').strip())
    if pat is None or len(quote) > len(note) + 64:
        return None
    m = pat.search(note)
    return Span(m.start(), m.end(), m.group(0)) if m else None


def quote_in_note(note: str, quote: str, min_chars: int = 2) -> bool:
    """True when a non-trivial quote is copied from the note (the evidence check of rewards)."""
    return isinstance(quote, str) and len(quote.strip()) >= min_chars and find_span(note, quote) is not None


def _simplify(text: str) -> str:
    out = _DROP.sub(" ", text)
    return _WS.sub(" ", out).strip(" ,;")


@functools.lru_cache(maxsize=50_000)
def terms(code: str) -> tuple[str, ...]:
    """Words a note may use for `code`, most specific first (longer terms before abbreviations)."""
    c = codes.normalize(code)
    found: list[str] = []
    desc = codes.describe(c)
    if desc:  # notes drop "unspecified" and lower-case: "Acute kidney failure, unspecified" -> "acute kidney failure"
        found += [desc, desc.replace(", unspecified", "").replace("Unspecified ", ""), _simplify(desc)]
    found += [_simplify(t) for t in codes.inclusion_terms(c)]
    for prefix in sorted((p for p in ABBREVIATIONS if c.startswith(p)), key=len, reverse=True):
        found += ABBREVIATIONS[prefix]
    unique = [t for t in dict.fromkeys(found) if len(t) >= 2]
    long_terms = sorted((t for t in unique if len(t) > 6), key=len, reverse=True)
    return tuple(long_terms + [t for t in unique if len(t) <= 6])


@functools.lru_cache(maxsize=50_000)
def _term_pattern(term: str) -> re.Pattern[str]:
    words = _flexible(term)
    # whole words only; short all-caps abbreviations match case-sensitively (HD is not "hd" in "had")
    flags = 0 if (term.isupper() and len(term) <= 4) else re.IGNORECASE
    return re.compile(rf"(?<![\w]){words}s?(?![\w])", flags)  # a plural still matches: "Penicillins"


def locate(code: str, note: str) -> Span | None:
    """The first place the note documents `code` by one of its terms, trying the most specific first."""
    for term in terms(code):
        m = _term_pattern(term).search(note)
        if m:
            return Span(m.start(), m.end(), m.group(0))
    return None


def quote_around(note: str, span: Span, max_chars: int = 120) -> str:
    """The note's own line around a match, clipped to `max_chars`: a readable verbatim quote."""
    line_start = note.rfind("\n", 0, span.start) + 1
    line_end = note.find("\n", span.end)
    line_end = len(note) if line_end == -1 else line_end
    start, end = line_start, line_end
    if end - start > max_chars:  # clip to whole words around the match
        half = max(0, (max_chars - (span.end - span.start)) // 2)
        start = max(line_start, span.start - half)
        end = min(line_end, span.end + half)
        while start > line_start and not note[start - 1].isspace() and start < span.start:
            start += 1
        while end < line_end and not note[end].isspace() and end > span.end:
            end -= 1
    return note[start:end].strip(" -#\t,;")
