"""ICD-10-CM knowledge: the one place in icdray that knows the code system.

Built on `simple-icd-10-cm` (the CDC release it bundles). That import costs seconds and ~190 MB,
so it happens lazily, once per process, on the first call that needs it; `import icdray.codes`
stays cheap.

Codes are stored dotted and upper-case (`N17.9`); MIMIC-IV stores them without dots (`N179`).
`normalize` converts any spelling. "Valid" means *assignable*: a billable leaf of the release, or a
code listed in an extension table. Real MIMIC-IV was coded against older releases, so some of its
codes (E87.2, N18.3, R51, ...) became categories later; a `Codebook` built from MIMIC's
`d_icd_diagnoses` accepts them, so they are not counted as invalid predictions.

Deliberately left out: ICD-9 (MIMIC rows with `icd_version == 9` are dropped by `prepare`),
procedure codes (ICD-10-PCS) and GEMs mappings between versions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from types import ModuleType

_STRIP = re.compile(r"[\s.]")
_SHAPE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")


@functools.cache
def _cm() -> ModuleType:
    import simple_icd_10_cm as cm  # heavy: loaded once per process

    return cm


def normalize(code: str) -> str:
    """`n179`, ` N17.9 `, `N17.9` -> `N17.9`. Never raises; returns "" for empty or non-string input.

    Only the spelling is fixed; use `is_valid` to check the code exists.
    """
    if not isinstance(code, str):
        return ""
    raw = _STRIP.sub("", code).upper()
    if len(raw) <= 3:
        return raw
    return f"{raw[:3]}.{raw[3:]}"


def looks_like_code(code: str) -> bool:
    """True if the normalised string has the shape of an ICD-10-CM code (letter, digit, alnum, ...)."""
    return bool(_SHAPE.match(normalize(code)))


def category(code: str) -> str:
    """The 3-character category (`N17.9` -> `N17`)."""
    return normalize(code)[:3]


@functools.cache
def billable_codes() -> tuple[str, ...]:
    """All billable (leaf) codes of the bundled release, dotted, in tabular order."""
    cm = _cm()
    # get_all_codes lists a few items twice (codes that are also one-code blocks, e.g. Z66): dedupe.
    leaves = (c for c in cm.get_all_codes(True) if cm.is_category_or_subcategory(c) and cm.is_leaf(c))
    return tuple(dict.fromkeys(leaves))


@functools.cache
def _billable_set() -> frozenset[str]:
    return frozenset(billable_codes())


def is_billable(code: str) -> bool:
    """A leaf of the bundled release (the codes a claim may carry today)."""
    return normalize(code) in _billable_set()


def in_release(code: str) -> bool:
    """Any item of the release: chapter, block, category or subcategory."""
    c = normalize(code)
    return bool(c) and _cm().is_valid_item(c)


def is_valid(code: str) -> bool:
    """Assignable under the bundled release (billable). For MIMIC data use `Codebook.is_valid`."""
    return DEFAULT.is_valid(code)


def describe(code: str) -> str | None:
    """Official description (`N17.9` -> 'Acute kidney failure, unspecified'), or None if unknown."""
    return DEFAULT.describe(code)


def chapter(code: str) -> str | None:
    """The chapter number as a string ('14' for N17.9), or None if the code is unknown."""
    c = normalize(code)
    if not c:
        return None
    cm = _cm()
    for probe in (c, c[:3]):
        if cm.is_valid_item(probe):
            return probe if cm.is_chapter(probe) else cm.get_ancestors(probe)[-1]
    return None


def ancestors(code: str) -> list[str]:
    """Ancestors from nearest to farthest: subcategories, category, block, chapter."""
    c = normalize(code)
    cm = _cm()
    if c and cm.is_valid_item(c):
        return list(cm.get_ancestors(c))
    if c[:3] and cm.is_valid_item(c[:3]):  # a retired code: its category still exists
        return [c[:3], *cm.get_ancestors(c[:3])]
    return []


def inclusion_terms(code: str) -> list[str]:
    """Inclusion terms listed under the code ('Acute kidney injury (nontraumatic)' for N17.9)."""
    c = normalize(code)
    return list(_cm().get_inclusion_term(c)) if in_release(c) else []


def use_additional_codes(code: str) -> list[str]:
    """Codes named by 'use additional code' notes on the code or any of its ancestors."""
    c = normalize(code)
    if not in_release(c):
        return []
    cm = _cm()
    found: list[str] = []
    for item in [c, *cm.get_ancestors(c)]:
        for ref in re.findall(
            r"\(([A-Z][0-9][0-9A-Z](?:\.[0-9A-Z-]{1,4})?)\)", cm.get_use_additional_code(item)
        ):
            if ref not in found:
                found.append(ref)
    return found


NOTE_KINDS = ("excludes1", "excludes2", "code_first", "use_additional", "code_also")


def notes(code: str, kind: str, up_to_category: bool = False) -> list[tuple[str, str]]:
    """(node, note line) of the tabular list's `kind` notes on the code and its ancestors.

    Notes sit on the node where the tabular list prints them (E11's "type 1 diabetes" Excludes1 applies
    to every E11 code), so ancestors are walked; `up_to_category` stops at the 3-character category (for
    instructional notes whose block- and chapter-level versions are too general to check).
    """
    if kind not in NOTE_KINDS:
        raise ValueError(f"note kind must be one of {NOTE_KINDS}, got {kind!r}")
    c = normalize(code)
    if not in_release(c):
        return []
    cm = _cm()
    nodes = [
        c,
        *(
            a
            for a in cm.get_ancestors(c)
            if not up_to_category or (len(a) >= 3 and "-" not in a and a[0].isalpha())
        ),
    ]
    out = []
    for node in nodes:
        if kind in ("excludes1", "excludes2"):
            lines = (cm.get_excludes1 if kind == "excludes1" else cm.get_excludes2)(node)
        else:
            getter = {
                "code_first": cm.get_code_first,
                "use_additional": cm.get_use_additional_code,
                "code_also": cm.get_code_also,
            }[kind]
            lines = [x for x in getter(node).splitlines() if x.strip()]
        out += [(node, line) for line in lines]
    return out


class Codebook:
    """The release plus an optional extension table (code -> title), e.g. MIMIC's `d_icd_diagnoses`.

    Immutable after construction, cheap to pickle (the release itself is never pickled), so it can
    be shipped to Ray workers.
    """

    def __init__(self, extra: Mapping[str, str] | None = None) -> None:
        self.extra: dict[str, str] = {normalize(k): v for k, v in (extra or {}).items() if normalize(k)}

    def is_valid(self, code: str) -> bool:
        c = normalize(code)
        return c in self.extra or c in _billable_set()

    def describe(self, code: str) -> str | None:
        c = normalize(code)
        if c and _cm().is_valid_item(c):
            return _cm().get_description(c)
        return self.extra.get(c)

    def invalid(self, codes: Iterable[str]) -> list[str]:
        return [c for c in codes if not self.is_valid(c)]

    def __len__(self) -> int:
        return len(_billable_set() | self.extra.keys())

    def __repr__(self) -> str:
        return f"Codebook(release+{len(self.extra)} extra)"


DEFAULT = Codebook()
