from icdray import notes

NOTE = "\n".join(
    [  # MIMIC separates sections with lines holding a single space
        " ",
        "Name:  ___                     Unit No:   ___",
        " ",
        "Allergies: ",
        "Penicillins",
        " ",
        "Chief Complaint:",
        "fever",
        " ",
        "History of Present Illness:",
        "Ms. ___ is a 70 y/o woman with HTN who presented with sepsis.",
        "VS: T 101 (not a heading)",
        " ",
        "Brief Hospital Course:",
        "# Sepsis: treated with antibiotics.",
        " ",
        "Discharge Diagnosis:",
        "Primary:",
        "Sepsis",
        " ",
        "Discharge Instructions:",
        "You were admitted for an infection.",
        " ",
        "Followup Instructions:",
        "___",
        "",
    ]
)


def test_split_sections_keeps_unknown_colons_inside():
    secs = notes.split_sections(NOTE)
    heads = [s.heading for s in secs]
    assert heads == [
        "",
        "Allergies",
        "Chief Complaint",
        "History of Present Illness",
        "Brief Hospital Course",
        "Discharge Diagnosis",
        "Discharge Instructions",
        "Followup Instructions",
    ]
    hpi = next(s for s in secs if s.heading == "History of Present Illness")
    assert "VS: T 101" in hpi.body


def test_leaky_section_removed_by_default_and_kept_on_request():
    removed = notes.prepare_note(NOTE)
    assert "Discharge Diagnosis" not in removed.text and "Primary:" not in removed.text
    assert "Brief Hospital Course:\n# Sepsis" in removed.text
    kept = notes.prepare_note(NOTE, keep_discharge_diagnosis=True)
    assert "Discharge Diagnosis:\nPrimary:\nSepsis" in kept.text


def test_budget_drops_low_value_sections_first_then_cuts():
    full = notes.prepare_note(NOTE)
    assert not full.truncated
    small = notes.prepare_note(NOTE, max_tokens=full.n_tokens - 3)
    assert small.truncated and small.n_tokens <= full.n_tokens - 3
    assert "Followup Instructions" not in small.sections  # dropped first
    assert "History of Present Illness" in small.sections
    tiny = notes.prepare_note(NOTE, max_tokens=10)
    assert tiny.n_tokens <= 10 and tiny.truncated


def test_clean_normalises_whitespace_but_keeps_placeholders():
    text = notes.clean("a  \r\n\r\n\r\n  \n___ b\t c  \n")
    assert text == "a\n\n___ b  c"
