import pytest

from icdray import codes


@pytest.mark.parametrize("raw", ["N179", "n17.9", " N17.9 ", "N17.9", "n 179"])
def test_normalize_spellings(raw):
    assert codes.normalize(raw) == "N17.9"


def test_normalize_short_and_bad_inputs():
    assert codes.normalize("i10") == "I10"
    assert codes.normalize("") == ""
    assert codes.normalize(None) == ""  # type: ignore[arg-type]
    assert codes.normalize("s72001a") == "S72.001A"


def test_validity_and_billability():
    assert codes.is_valid("N17.9") and codes.is_billable("N179")
    assert not codes.is_valid("N17")  # a category is not assignable
    assert codes.in_release("N17") and not codes.is_billable("N17")
    assert not codes.is_valid("XYZ.1") and not codes.looks_like_code("hello")
    assert codes.looks_like_code("E11.9")


def test_retired_mimic_code_is_valid_through_codebook():
    # E87.2 was billable when MIMIC-IV was coded; the bundled release split it into E87.20-E87.29
    assert not codes.is_valid("E87.2")
    book = codes.Codebook({"E872": "Acidosis"})
    assert book.is_valid("E87.2") and book.describe("E87.2") == "Acidosis"
    assert book.is_valid("N17.9")  # the release stays valid
    assert book.invalid(["E87.2", "N17.9", "BAD"]) == ["BAD"]


def test_descriptions_hierarchy_and_notes():
    assert codes.describe("N17.9") == "Acute kidney failure, unspecified"
    assert codes.describe("ZZZ") is None
    assert codes.category("N17.9") == "N17"
    assert codes.chapter("N17.9") == "14" and codes.chapter("I10") == "9"
    assert codes.ancestors("N17.9") == ["N17", "N17-N19", "14"]
    assert codes.ancestors("N18.3")[0] == "N18"  # retired code: its category's chain
    assert "Acute kidney injury (nontraumatic)" in codes.inclusion_terms("N17.9")
    assert {"Z79.4", "Z79.84"} <= set(codes.use_additional_codes("E11.9"))


def test_billable_code_count_matches_release():
    billable = codes.billable_codes()
    assert 74_000 < len(billable) < 75_000
    assert len(set(billable)) == len(billable)
    assert all(codes.is_billable(c) for c in billable[::997])
