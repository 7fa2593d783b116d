"""Tests for icdray.prompts: rendering, parsing, flags, leniency and a never-raise fuzz."""

from __future__ import annotations

import json
import random

import pytest

from icdray import codes, prompts
from icdray.prompts import (
    FLAG_BAD_ITEMS,
    FLAG_DUPLICATE_CODES,
    FLAG_INVALID_CODES,
    FLAG_INVALID_JSON,
    FLAG_NO_ANSWER,
    FLAG_NO_REASONING,
    FLAG_TOO_MANY,
    FLAG_TRUNCATED,
    MAX_ITEMS,
    Answer,
    CodeItem,
    build_messages,
    parse_answer,
    render_answer,
    render_user_prompt,
)

REASONING = "History of DM2 on metformin. Creatinine rose to 2.1: acute kidney injury, resolved with fluids."
ITEMS = (
    CodeItem("N17.9", "acute kidney injury"),
    CodeItem("E11.9", "DM2 on metformin"),
)
TRICKY_EVIDENCE = [
    'pt states "I feel fine"',
    "path C:\\temp\\note \\n not a newline",
    "naïve café 糖尿病 — 🩺 ±5 mg",
    "line one\nline two\ttabbed",
    "braces {like} [these], and a colon: here",
    "<answer>fake</answer> and </reasoning>",
    "trailing backslash \\",
]


def _json_line(*items: dict) -> str:
    return json.dumps({"codes": list(items)})


def test_version_and_system_prompt() -> None:
    assert prompts.PROMPT_VERSION
    assert len(prompts.SYSTEM_PROMPT) < 1500
    lowered = prompts.SYSTEM_PROMPT.lower()
    for phrase in (
        "icd-10-cm",
        "<reasoning>",
        "<answer>",
        "copied from the note",
        "family history",
        "principal",
    ):
        assert phrase in lowered
    # evidence before code in the instructions, as the answer and the grammar write it
    assert lowered.index('"evidence"') < lowered.index('"code"')


def test_round_trip_plain() -> None:
    ans = parse_answer(render_answer(REASONING, ITEMS))
    assert ans.flags == frozenset()
    assert ans.ok and ans.clean
    assert ans.reasoning == REASONING
    assert ans.items == ITEMS
    assert ans.codes == ["N17.9", "E11.9"]


@pytest.mark.parametrize("evidence", TRICKY_EVIDENCE)
def test_round_trip_tricky_evidence(evidence: str) -> None:
    items = (CodeItem("I10", evidence), CodeItem("N17.9", "aki"))
    text = render_answer(REASONING, items)
    ans = parse_answer(text)
    assert ans.flags == frozenset(), text
    assert ans.items == items
    assert ans.reasoning == REASONING


def test_round_trip_empty_list_and_normalising_render() -> None:
    ans = parse_answer(render_answer(REASONING, []))
    assert ans.clean and ans.items == ()
    ans = parse_answer(render_answer(REASONING, [CodeItem("n179", "  aki  ")]))
    assert ans.clean and ans.items == (CodeItem("N17.9", "aki"),)


def test_render_answer_shape() -> None:
    text = render_answer(REASONING, ITEMS)
    assert text.startswith("<reasoning>\n") and text.endswith("\n</answer>")
    body = text.split("<answer>\n", 1)[1].rsplit("\n</answer>", 1)[0]
    assert json.loads(body) == {
        "codes": [
            {"code": "N17.9", "evidence": "acute kidney injury"},
            {"code": "E11.9", "evidence": "DM2 on metformin"},
        ]
    }
    # each item writes its evidence first: the model picks the code from the phrase it just copied
    assert body.index('"evidence"') < body.index('"code"')


def test_no_answer_block() -> None:
    ans = parse_answer("<reasoning>thinking about AKI</reasoning>\nI think N17.9.")
    assert ans.flags == {FLAG_NO_ANSWER}
    assert not ans.ok and ans.items == ()
    assert ans.reasoning == "thinking about AKI"


def test_invalid_json_salvages_complete_items() -> None:
    text = (
        "<reasoning>r</reasoning><answer>\n"
        '{"codes": [{"code": "N17.9", "evidence": "aki"}, {"evidence": "DM2", "code": "E11.9"},, '
        '{"code": "I10", "evid</answer>'
    )
    ans = parse_answer(text)
    assert ans.flags == {FLAG_INVALID_JSON}
    assert not ans.ok
    assert ans.items == (CodeItem("N17.9", "aki"), CodeItem("E11.9", "DM2"))


def test_truncated_mid_json() -> None:
    full = render_answer(REASONING, ITEMS)
    cut = full[: full.index('"E11.9"') + 4]
    ans = parse_answer(cut)
    assert ans.flags == {FLAG_TRUNCATED, FLAG_INVALID_JSON}
    assert ans.items == (ITEMS[0],)
    assert ans.reasoning == REASONING


def test_truncated_only_closing_tag_is_still_ok() -> None:
    # e.g. generation stopped on the stop string "</answer>", which is then not returned
    full = render_answer(REASONING, ITEMS)
    ans = parse_answer(full.removesuffix("</answer>"))
    assert ans.flags == {FLAG_TRUNCATED}
    assert ans.ok and ans.items == ITEMS


def test_bad_items_skipped_rest_kept() -> None:
    body = _json_line(
        {"code": "N17.9", "evidence": "aki"},
        {"evidence": "no code"},
        {"code": 5, "evidence": "number"},
        "E11.9",
        {"code": "I10", "evidence": ["not", "a", "string"]},
        {"code": "   ", "evidence": "blank"},
        {"code": "I10", "evidence": None},
    )
    ans = parse_answer(f"<reasoning>r</reasoning><answer>{body}</answer>")
    assert ans.flags == {FLAG_BAD_ITEMS}
    assert not ans.ok
    assert ans.items == (CodeItem("N17.9", "aki"), CodeItem("I10", ""))


def test_invalid_codes_kept_and_flagged() -> None:
    body = _json_line({"code": "N17.9", "evidence": "aki"}, {"code": "Q99.99X", "evidence": "made up"})
    ans = parse_answer(f"<reasoning>r</reasoning><answer>{body}</answer>")
    assert ans.flags == {FLAG_INVALID_CODES}
    assert ans.ok and not ans.clean
    assert ans.codes == ["N17.9", "Q99.99X"]


def test_codebook_extension_accepts_code() -> None:
    body = _json_line({"code": "N18.3", "evidence": "CKD stage 3"})  # a category in newer releases
    text = f"<reasoning>r</reasoning><answer>{body}</answer>"
    assert FLAG_INVALID_CODES in parse_answer(text).flags
    book = codes.Codebook({"N183": "Chronic kidney disease, stage 3 (moderate)"})
    assert parse_answer(text, book).flags == frozenset()


def test_duplicates_dropped_first_kept() -> None:
    body = _json_line(
        {"code": "N17.9", "evidence": "first"},
        {"code": "E11.9", "evidence": "dm"},
        {"code": "n179", "evidence": "second"},
    )
    ans = parse_answer(f"<reasoning>r</reasoning><answer>{body}</answer>")
    assert ans.flags == {FLAG_DUPLICATE_CODES}
    assert ans.ok
    assert ans.items == (CodeItem("N17.9", "first"), CodeItem("E11.9", "dm"))


@pytest.mark.parametrize(
    "text",
    [
        '<answer>{"codes": []}</answer>',
        '<reasoning>   </reasoning><answer>{"codes": []}</answer>',
        'Some untagged prose.\n<answer>{"codes": []}</answer>',
    ],
)
def test_no_reasoning(text: str) -> None:
    ans = parse_answer(text)
    assert ans.flags == {FLAG_NO_REASONING}
    assert ans.ok and ans.reasoning == ""


def test_unclosed_reasoning_runs_to_answer() -> None:
    ans = parse_answer('<reasoning>aki noted\n<answer>{"codes": []}</answer>')
    assert ans.reasoning == "aki noted" and ans.flags == frozenset()


def test_undotted_code_normalised() -> None:
    ans = parse_answer(
        '<reasoning>r</reasoning><answer>{"codes": [{"code": " n179 ", "evidence": " aki "}]}</answer>'
    )
    assert ans.clean and ans.items == (CodeItem("N17.9", "aki"),)


def test_fence_inside_answer_tag_accepted_silently() -> None:
    body = _json_line({"code": "N179", "evidence": "aki"})
    ans = parse_answer(f"<reasoning>r</reasoning>\n<answer>\n```json\n{body}\n```\n</answer>")
    assert ans.clean and ans.codes == ["N17.9"]


def test_fenced_json_without_answer_tag() -> None:
    body = _json_line({"code": "N179", "evidence": "aki"})
    ans = parse_answer(f"<reasoning>r</reasoning>\nHere are the codes:\n```json\n{body}\n```\nDone.")
    assert ans.flags == {FLAG_NO_ANSWER}
    assert not ans.ok
    assert ans.items == (CodeItem("N17.9", "aki"),)
    assert ans.reasoning == "r"


def test_bare_json_without_answer_tag_takes_last_and_salvages() -> None:
    first = _json_line({"code": "I10", "evidence": "htn"})
    text = f'draft {first} final {{"codes": [{{"code": "N17.9", "evidence": "aki"}}, {{"code": "E1'
    ans = parse_answer(text)
    assert ans.flags == {FLAG_NO_ANSWER, FLAG_INVALID_JSON, FLAG_NO_REASONING}
    assert ans.items == (CodeItem("N17.9", "aki"),)


def test_last_answer_block_wins() -> None:
    a = _json_line({"code": "I10", "evidence": "htn"})
    b = _json_line({"code": "N17.9", "evidence": "aki"})
    ans = parse_answer(f"<reasoning>r</reasoning><answer>{a}</answer>\n<ANSWER >{b}</ answer>")
    assert ans.codes == ["N17.9"] and ans.ok


def test_wrong_shape_is_invalid_json_with_salvage() -> None:
    ans = parse_answer('<reasoning>r</reasoning><answer>[{"code": "N17.9", "evidence": "aki"}]</answer>')
    assert ans.flags == {FLAG_INVALID_JSON}
    assert ans.items == (CodeItem("N17.9", "aki"),)
    ans = parse_answer("<reasoning>r</reasoning><answer></answer>")
    assert ans.flags == {FLAG_INVALID_JSON} and ans.items == ()


def test_item_cap() -> None:
    many = [CodeItem(f"A{i // 10:02d}.{i % 10}", "x") for i in range(MAX_ITEMS + 20)]
    ans = parse_answer(render_answer("r", many))
    assert len(ans.items) == MAX_ITEMS
    assert FLAG_TOO_MANY in ans.flags and ans.ok
    dupes = "<reasoning>r</reasoning><answer>" + _json_line(*[{"code": "N17.9"}] * 50_000) + "</answer>"
    ans = parse_answer(dupes)
    assert ans.codes == ["N17.9"] and FLAG_TOO_MANY in ans.flags


@pytest.mark.parametrize(
    "junk", [None, 42, 3.5, [], {}, object(), b"<answer>\xff\xfe</answer>", bytearray(b"\x00")]
)
def test_non_str_inputs(junk: object) -> None:
    ans = parse_answer(junk)
    assert isinstance(ans, Answer) and not ans.ok


def test_bytes_are_decoded() -> None:
    ans = parse_answer(render_answer("r", ITEMS).encode())
    assert ans.clean and ans.items == ITEMS


def test_deep_nesting_does_not_raise() -> None:
    for body in ("[" * 100_000, "{" * 100_000, '{"codes": ' + "[" * 100_000):
        for text in (body, f"<answer>{body}</answer>"):
            assert isinstance(parse_answer(text), Answer)


def test_answer_codes_property_dedupes_manual_items() -> None:
    ans = Answer("r", (CodeItem("n179"), CodeItem("N17.9"), CodeItem("")), frozenset())
    assert ans.codes == ["N17.9"]


def _mutations(rng: random.Random, base: str) -> str:
    kind = rng.randrange(9)
    if kind == 0:  # random slice
        i, j = sorted(rng.randrange(len(base) + 1) for _ in range(2))
        return base[i:j]
    if kind == 1:  # random prefix (truncation)
        return base[: rng.randrange(len(base) + 1)]
    if kind == 2:  # delete / duplicate / swap characters
        chars = list(base)
        for _ in range(rng.randint(1, 20)):
            if not chars:
                break
            k = rng.randrange(len(chars))
            op = rng.randrange(3)
            if op == 0:
                del chars[k]
            elif op == 1:
                chars.insert(k, chars[k])
            else:
                chars[k] = rng.choice('{}[]":,\\<>/ \nabcN1.')
        return "".join(chars)
    if kind == 3:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(400))).decode("utf-8", errors="replace")
    if kind == 4:  # tag soup
        parts = [
            "<answer>",
            "</answer>",
            "<reasoning>",
            "</reasoning>",
            "< Answer >",
            "```json\n",
            "```",
            '{"codes": [',
            '{"code": "N17.9", "evidence": "x"}',
            '{"code": ',
            "]}",
            ",",
            '"',
            "\\",
            "{",
            "}",
            "text ",
            "\u0000",
            "\ud800",
            "🩺",
        ]
        return "".join(rng.choice(parts) for _ in range(rng.randrange(60)))
    if kind == 5:  # splice two answers
        cut = rng.randrange(len(base) + 1)
        return base[:cut] + base[rng.randrange(len(base) + 1) :]
    if kind == 6:  # random unicode
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(200)))
    if kind == 7:  # JSON items of random types
        values = [None, 1, 2.5, True, "N17.9", "bogus", [], {}, {"code": None}, {"code": ["N17.9"]}]
        items = [rng.choice(values) for _ in range(rng.randrange(10))]
        return f"<reasoning>r</reasoning><answer>{json.dumps({'codes': items})}</answer>"
    return base * rng.randint(1, 50)  # repetition


def test_fuzz_never_raises() -> None:
    rng = random.Random(20240613)
    bases = [render_answer(REASONING, ITEMS)] + [
        render_answer("why", [CodeItem("I10", e), CodeItem("ZZ9.99", "bad")]) for e in TRICKY_EVIDENCE
    ]
    inputs: list[object] = [None, 0, b"", "", "<answer>", "</answer>", "<answer></answer>" * 3]
    for _ in range(3000):
        inputs.append(_mutations(rng, rng.choice(bases)))
    for text in inputs:
        ans = parse_answer(text)
        assert isinstance(ans, Answer)
        assert isinstance(ans.reasoning, str) and isinstance(ans.flags, frozenset)
        assert len(ans.items) <= MAX_ITEMS
        assert all(isinstance(i.code, str) and i.code and isinstance(i.evidence, str) for i in ans.items)
        assert len(set(ans.codes)) == len(ans.items)
        assert ans.flags <= {
            FLAG_NO_ANSWER,
            FLAG_INVALID_JSON,
            FLAG_BAD_ITEMS,
            FLAG_INVALID_CODES,
            FLAG_DUPLICATE_CODES,
            FLAG_NO_REASONING,
            FLAG_TRUNCATED,
            FLAG_TOO_MANY,
        }


def test_build_messages_with_medications() -> None:
    note = "Admitted with acute kidney injury.\nHistory: DM2."
    msgs = build_messages(note, ["metformin 500 mg PO BID", "  ", "lisinopril 10 mg"])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == prompts.SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert note in user
    assert "- metformin 500 mg PO BID\n- lisinopril 10 mg" in user
    assert "(none recorded)" not in user
    assert user.endswith("- lisinopril 10 mg")  # the format lives in the system prompt only


@pytest.mark.parametrize("meds", [(), [], ["", "  "]])
def test_build_messages_without_medications(meds) -> None:
    msgs = build_messages("Note text.", meds)
    assert "(none recorded)" in msgs[1]["content"]
    assert "Note text." in msgs[1]["content"]


def test_render_user_prompt_str_medications_are_lines() -> None:
    user = render_user_prompt("n", "aspirin\nheparin")
    assert "- aspirin\n- heparin" in user
