"""Coding edits and MS-DRG grouping on fixed cases from the code system and the CMS tables."""

import pytest

from icdray import drg, edits


def _rules(chart, age=None, sex=None):
    return {(e.severity, e.rule, e.codes) for e in edits.edits(chart, age, sex)}


def test_manifestation_as_principal_is_an_error():
    found = _rules(["G63"])
    assert ("error", "mce_manifestation_as_pdx", ("G63",)) in found
    assert ("error", "code_first", ("G63",)) in found  # and its underlying condition is not coded
    assert edits.blocking(edits.edits(["G63"]))


def test_use_additional_partner_missing_is_a_warning():
    found = _rules(["E11.22", "I10", "Z79.4"])
    assert ("warning", "use_additional", ("E11.22",)) in found  # the CKD stage (N18.1-N18.6) is missing
    assert not edits.blocking(edits.edits(["E11.22", "I10", "Z79.4"]))
    assert ("warning", "use_additional", ("E11.22",)) not in _rules(["E11.22", "N18.30", "Z79.4"])


def test_excludes1_conflicts_walk_ancestors_both_ways():
    assert ("error", "excludes1", ("E11.9", "E10.9")) in _rules(
        ["E11.9", "E10.9"]
    )  # the note sits on E11/E10
    assert ("error", "excludes1", ("J45.909", "R06.2")) in _rules(["J45.909", "R06.2"])
    # a qualifier is read: G63's note excludes diabetic polyneuropathy (E08-E13 with .42), not E11.9
    assert ("error", "excludes1", ("G63", "E11.42")) in _rules(["G63", "E11.42"])
    assert not any(r == "excludes1" for _, r, _ in _rules(["E11.9", "G63"]))


def test_mce_edits_with_age_and_external_cause():
    assert ("error", "mce_e_code_as_pdx", ("W19.XXXA",)) in _rules(["W19.XXXA", "S72.001A"])
    assert ("error", "mce_age_conflict", ("O80",)) in _rules(["O80"], age=70)
    assert not any(r == "mce_age_conflict" for _, r, _ in _rules(["O80"], age=30))
    assert _rules(["I50.23", "J96.01"]) == set()  # a clean chart


def test_note_references_parse_codes_wildcards_ranges_and_qualifiers():
    assert edits.references("type 1 diabetes mellitus (E10.-)") == [("E10", "E10", "")]
    assert edits.references("stage (N18.1-N18.6)") == [("N181", "N186", "")]
    assert edits.references("(I15.0, I15.1)") == [("I150", "I150", ""), ("I151", "I151", "")]
    assert edits.references("diabetes (E08-E13 with .42)") == [("E08", "E13", "42")]
    assert edits.references("(B27.0-B27.9 with fifth character 1)") == []  # unreadable: skipped
    assert edits.covers(("N181", "N186", ""), "N18.30") and not edits.covers(("N181", "N186", ""), "N18.9")
    assert edits.covers(("E08", "E13", "42"), "E11.42") and not edits.covers(("E08", "E13", "42"), "E11.9")


def test_drg_heart_failure_with_respiratory_failure_groups_to_291():
    g = drg.group(["I50.23", "J96.01", "N17.9"], age=70, sex="M")
    assert (g.drg, g.description, g.mdc) == (291, "Heart Failure and Shock with MCC", 5)
    sev = {s.code: (s.severity, s.changes_drg) for s in g.secondaries}
    assert sev == {
        "J96.01": ("MCC", True),
        "N17.9": ("CC", False),
    }  # one MCC moves the DRG; the CC adds nothing
    assert {w["principal"]: w["drg"] for w in g.what_if} == {"I50.23": 291, "J96.01": 189, "N17.9": 682}
    assert drg.group([]) is None
    with pytest.raises(ValueError, match="sex"):
        drg.group(["I10"], sex="X")
