"""Coding edits: what a claim scrubber would flag in a coded chart, from the code system itself.

    edits(codes in sequence order, age, sex) -> [Edit(severity error|warning, rule, codes, message)]

Rules (the first code is the principal diagnosis):
- `excludes1` (error): two codes the tabular list says are never coded together (an Excludes1 note on
  either code or any of its ancestors names the other: E11.9 with E10.9).
- `code_first` (error): a manifestation code (the MCE's own list) whose "code first" note names an
  underlying condition, none of which is coded (G63 without its etiology).
- `use_additional` (warning): a "use additional code" note on the code or its category names codes of
  which none is coded (E11.22 without an N18 stage); notes that say "if applicable" are not checked.
- the CMS Medicare Code Editor (`drg.mce`): external cause, manifestation or unacceptable code as
  principal, duplicate of the principal, invalid code (errors), age conflict (error; with the patient's
  age), non-specific principal and questionable admission (warnings). The MCE reports counts per claim;
  the codes are found by editing each code alone.

Note references are parsed from the parentheses of each note line: a code (`I15.0`: it and its
children), a category wildcard (`E10.-`), a range (`N18.1-N18.6`, `E08-E13`), and the qualifier
`with .42` (the code's subcategory must be .42). Other qualifiers ("with fifth character 1") are
skipped: a rule that cannot be read never raises an edit.
Left out: Excludes2 (a note that the two may be coded together), sequencing rules beyond the MCE's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from icdray import codes as icd
from icdray import drg

ERROR, WARNING = "error", "warning"
_MCE = {  # MCE edit -> (severity, which codes it concerns)
    "E_CODE_AS_PDX": (ERROR, "principal", "an external cause code cannot be the principal diagnosis"),
    "MANIFESTATION_AS_PDX": (ERROR, "principal", "a manifestation code cannot be the principal diagnosis"),
    "UNACCEPTABLE_PDX": (ERROR, "principal", "this code is not acceptable as a principal diagnosis"),
    "NONSPECIFIC_PDX": (WARNING, "principal", "a non-specific principal diagnosis"),
    "QUESTIONABLE_ADMISSION": (WARNING, "principal", "a questionable reason for an inpatient admission"),
    "DUPLICATE_OF_PDX": (ERROR, "duplicate", "a secondary diagnosis repeats the principal"),
    "INVALID_CODE": (ERROR, "each", "not a valid ICD-10-CM code for this discharge"),
    "AGE_CONFLICT": (ERROR, "each", "inconsistent with the patient's age"),
    "SEX_CONFLICT": (ERROR, "each", "inconsistent with the patient's sex"),
}
_REF = re.compile(r"\(([^()]*)\)")
_CODE = r"[A-Z]\d[0-9A-Z](?:\.[0-9A-Z]{1,4})?"


@dataclass(frozen=True)
class Edit:
    severity: str  # error (blocks submission) | warning
    rule: str
    codes: tuple[str, ...]
    message: str

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["codes"] = list(self.codes)
        return d


def _raw(code: str) -> str:
    return icd.normalize(code).replace(".", "")


def references(line: str) -> list[tuple[str, str, str]]:
    """(low, high, qualifier) ranges of undotted code prefixes named in a note line's parentheses."""
    out = []
    for group in _REF.findall(line):
        for token in group.split(","):
            token = token.strip()
            qual = ""
            if " with " in token:
                token, qual = (x.strip() for x in token.split(" with ", 1))
                if not re.fullmatch(r"\.[0-9A-Z]{1,4}", qual):
                    continue  # a qualifier we cannot read: skip the reference, never guess
            token = token.replace(".-", "").rstrip("-")
            m = re.fullmatch(rf"({_CODE})(?:-({_CODE}))?", token)
            if m:
                lo = m.group(1).replace(".", "")
                out.append((lo, (m.group(2) or m.group(1)).replace(".", ""), qual.lstrip(".")))
    return out


def covers(ref: tuple[str, str, str], code: str) -> bool:
    lo, hi, qual = ref
    c = _raw(code)
    if not lo <= c[: len(lo)] or not c[: len(hi)] <= hi:
        return False
    return not qual or c[3:].startswith(qual)


def _named(code: str, kind: str, others: Sequence[str], up_to_category: bool) -> dict[str, tuple[list, bool]]:
    """node -> (its notes' references, whether any of `others` is among them)."""
    by_node: dict[str, list] = {}
    conditional: set[str] = set()
    for node, line in icd.notes(code, kind, up_to_category):
        by_node.setdefault(node, []).extend(references(line))
        if "if applicable" in line:
            conditional.add(node)  # "use additional code, if applicable": nothing to check
    return {
        n: (refs, any(covers(r, o) for r in refs for o in others))
        for n, refs in by_node.items()
        if n not in conditional
    }


def _mce_edits(chart: list[str], age: int | None, sex: str | None) -> list[Edit]:
    out = []
    for e in drg.mce(chart, age, sex):
        severity, scope, text = _MCE.get(e["name"], (WARNING, "claim", e["name"].lower().replace("_", " ")))
        if scope == "principal":
            who = [chart[0]]
        elif scope == "duplicate":
            who = [c for c in chart[1:] if c == chart[0]] or [chart[0]]
        elif scope == "each":
            who = [c for c in chart if any(x["name"] == e["name"] for x in drg.mce([c], age, sex))] or chart
        else:
            who = chart
        out.append(Edit(severity, f"mce_{e['name'].lower()}", tuple(who), f"{', '.join(who)}: {text}"))
    return out


def edits(codes: Sequence[str], age: int | None = None, sex: str | None = None) -> list[Edit]:
    """Every edit of the chart (first code = principal), errors first."""
    chart = [icd.normalize(c) for c in codes if icd.normalize(c)]
    out: list[Edit] = []
    unique = list(dict.fromkeys(chart))
    for i, a in enumerate(unique):
        for b in unique[i + 1 :]:
            if any(hit for _, hit in _named(a, "excludes1", [b], False).values()) or any(
                hit for _, hit in _named(b, "excludes1", [a], False).values()
            ):
                out.append(
                    Edit(ERROR, "excludes1", (a, b), f"{a} and {b} are not coded together (Excludes1)")
                )
    for c in unique:
        others = [o for o in unique if o != c]
        if drg.is_manifestation(c):
            for node, (refs, present) in _named(c, "code_first", others, True).items():
                if refs and not present:
                    out.append(
                        Edit(
                            ERROR,
                            "code_first",
                            (c,),
                            f"{c} is a manifestation: code its underlying "
                            f"condition first (the note on {node})",
                        )
                    )
        for node, (refs, present) in _named(c, "use_additional", others, True).items():
            if refs and not present:
                named = ", ".join(f"{lo}-{hi}" if lo != hi else lo for lo, hi, _ in refs[:4])
                out.append(
                    Edit(
                        WARNING,
                        "use_additional",
                        (c,),
                        f"{c}: use an additional code ({named}; the note on {node})",
                    )
                )
    if chart:
        out += _mce_edits(chart, age, sex)
    return sorted(out, key=lambda e: e.severity != ERROR)


def blocking(found: Sequence[Edit]) -> bool:
    """Whether any edit stops the chart from being submitted."""
    return any(e.severity == ERROR for e in found)
