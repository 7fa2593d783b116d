"""Where an evaluation pass spends its time: prompt prefill against constrained decoding.

    python benchmarks/eval_pass.py --storage /tmp/demo5 --model /tmp/demo5/checkpoints/sft --notes 100
    python benchmarks/eval_pass.py ... --no-guards      # the grammar alone, without icdray's two guards

Builds the evaluation's engine (`evaluate.engine`, on every core), encodes the first N test notes of a
pipeline's storage as evaluation does, and times on the same engine:
- a prefill-only pass (one free token per note);
- the constrained greedy pass evaluation runs (the prefix cache reset first, so it prefills again).
Decoding's share is the constrained pass less the prefill-only one. Run it on an idle machine: the pass
is compute-bound (`py-spy record` on it puts the attention kernel and the GEMMs at two thirds of the
samples, the grammar and the guards at a few percent).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from icdray import chat, grammar, layout
from icdray.config import load_config
from icdray.engine import SamplingSpec, cpu_bind, make_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="artifacts", help="a pipeline's storage root (prompts, label space)")
    ap.add_argument("--model", required=True, help="a checkpoint folder or registry name")
    ap.add_argument("--notes", type=int, default=100)
    ap.add_argument("--no-guards", action="store_true", help="the grammar only (no repeat or quote guard)")
    args = ap.parse_args()

    cfg = load_config(None, [f"storage={args.storage}"])
    table = layout.read_split(args.storage, "test", ["note", "medications"]).slice(0, args.notes)
    constraint = grammar.constraint(layout.label_space(args.storage), cfg.answer)
    guards = not args.no_guards
    ecfg = replace(
        cfg.evaluate.engine,
        threads=2,
        threads_bind=cpu_bind("all"),
        no_repeat_codes=guards,
        note_quotes=guards,
    )
    t = time.perf_counter()
    eng = make_engine(args.model, ecfg, constraint)
    startup = time.perf_counter() - t
    ids = [
        chat.encode_prompt(eng.tok, n, m, cfg.inputs.max_prompt_tokens, cfg.inputs.thinking)
        for n, m in zip(table["note"].to_pylist(), table["medications"].to_pylist(), strict=True)
    ]
    prompt_tokens = sum(map(len, ids))
    t = time.perf_counter()
    eng.generate(ids, SamplingSpec(n=1, temperature=0.0, max_tokens=1, constrained=False))
    prefill = time.perf_counter() - t
    eng.llm.reset_prefix_cache()
    t = time.perf_counter()
    out = eng.generate(
        ids, SamplingSpec(n=1, temperature=0.0, max_tokens=constraint.max_tokens, constrained=True)
    )
    total = time.perf_counter() - t
    answer_tokens = sum(len(o[0].token_ids) for o in out)
    print(f"| what ({len(ids)} notes, guards {'on' if guards else 'off'}) | figure |")
    print("|---|---|")
    print(f"| engine start | {startup:.1f} s |")
    print(
        f"| prefill only: {prompt_tokens:,} prompt tokens | {prefill:.1f} s, {prompt_tokens / prefill:.0f} tokens/s |"
    )
    print(f"| constrained greedy pass: {answer_tokens:,} answer tokens | {total:.1f} s |")
    print(
        f"| decoding (the pass less the prefill) | {answer_tokens / max(1e-6, total - prefill):.0f} tokens/s |"
    )


if __name__ == "__main__":
    main()
