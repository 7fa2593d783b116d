"""The answer guards' cost per decoded token, and whether the teacher's answers pass them.

    python benchmarks/answer_guards.py --storage artifacts --answers 100

Walks the first N distilled exemplar answers of a pipeline's storage (STORAGE/exemplars) token by token,
as the sampler's logits processor (`vllm_ext.AnswerGuards`) and the learner's mask replay see them, on
the SmolLM2 tokenizer, and prints:
- the time to build each guard (once per engine), and the time per token of `QuoteGuard.rule` and
  `RepeatGuard.banned`, inside quotes and elsewhere;
- how many of the teacher's quotes lie inside the note the prompt shows (the note is cut to the
  prompt's budget, so a quote from a cut passage cannot be written under the quote guard), and
  whether the guard allows every token of the answers whose quotes all lie inside.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from icdray import chat, codes, evidence, grammar, layout, models, prompts
from icdray.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="artifacts", help="a pipeline's storage root (with exemplars)")
    ap.add_argument("--answers", type=int, default=100)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    cfg = load_config(None, [f"storage={args.storage}"])
    tok = AutoTokenizer.from_pretrained(models.resolve(args.model))
    pieces = chat.token_pieces(tok)
    t = time.perf_counter()
    quotes = grammar.QuoteGuard(pieces)
    build_quotes = time.perf_counter() - t
    space = layout.label_space(args.storage)
    t = time.perf_counter()
    repeat = grammar.RepeatGuard(codes.billable_codes() if space is None else space, pieces)
    build_repeat = time.perf_counter() - t

    files = sorted(glob.glob(os.path.join(args.storage, "exemplars", "*.parquet")))
    if not files:
        raise SystemExit(
            f"no exemplars under {args.storage}/exemplars: run `icdray distill --storage ...` first"
        )
    rows = pq.read_table(files[0], columns=["note", "medications", "answer"]).to_pylist()[: args.answers]
    in_quote, elsewhere, repeat_s = [], [], []
    quotes_total = quotes_shown = answers_checked = answers_pass = 0
    for r in rows:
        shown, prompt_ids = chat.fit_note(
            tok, r["note"], list(r["medications"] or []), cfg.inputs.max_prompt_tokens
        )
        note = grammar.quote_text(grammar.note_of("".join(pieces[i] for i in prompt_ids)))
        items = prompts.parse_answer(r["answer"]).items
        inside = [evidence.quote_in_note(shown, it.evidence) for it in items]
        quotes_total += len(items)
        quotes_shown += sum(inside)
        ids = tok(r["answer"], add_special_tokens=False)["input_ids"]
        text, ok = "", True
        for i in ids:
            t = time.perf_counter()
            allowed, banned = quotes.rule(note, text)
            dt = time.perf_counter() - t
            (in_quote if allowed is not None else elsewhere).append(dt)
            if (allowed is not None and i not in allowed) or i in banned:
                ok = False
            t = time.perf_counter()
            repeat.banned(text)
            repeat_s.append(time.perf_counter() - t)
            text += pieces[i]
        if all(inside):
            answers_checked += 1
            answers_pass += ok

    def ms(xs: list[float]) -> str:
        if not xs:
            return "–"
        xs = sorted(xs)
        return f"{1e3 * statistics.mean(xs):.3f} mean, {1e3 * xs[int(0.99 * (len(xs) - 1))]:.3f} p99"

    print(f"tokenizer {args.model}: {len(pieces)} tokens; {len(rows)} exemplar answers")
    print("| what | figure |")
    print("|---|---|")
    print(f"| build QuoteGuard / RepeatGuard | {build_quotes:.2f} s / {build_repeat:.2f} s |")
    print(f"| QuoteGuard.rule, inside a quote ({len(in_quote)} tokens) | {ms(in_quote)} ms |")
    print(f"| QuoteGuard.rule, elsewhere ({len(elsewhere)} tokens) | {ms(elsewhere)} ms |")
    print(f"| RepeatGuard.banned, every token ({len(repeat_s)}) | {ms(repeat_s)} ms |")
    print(f"| teacher quotes inside the prompt's note | {quotes_shown}/{quotes_total} |")
    print(
        f"| answers with every quote inside that the guard passes whole | {answers_pass}/{answers_checked} |"
    )


if __name__ == "__main__":
    main()
