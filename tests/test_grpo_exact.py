"""GRPO exactness: the shared-prefix layout scores exactly what the padded layout scores, and constrained
rollouts are scored by the learner under the sampler's own token mask."""

from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoConfig, AutoTokenizer

from icdray import chat, evidence, grammar, layout, models, prepare, prompts
from icdray.config import PrepareConfig, load_config
from icdray.engine import SamplingSpec
from icdray.grpo import learner, packing
from icdray.grpo.loop import Controller
from icdray.grpo.masks import MaskReplay, unpack_bitmask

PROMPT_A = list(range(200, 260))
PROMPT_B = list(range(300, 333))
# two groups, ragged completions (one empty), so both layouts pad
ITEMS = [
    packing.Completion(PROMPT_A, [11, 12, 13, 14, 15, 16, 17]),
    packing.Completion(PROMPT_A, [21, 22]),
    packing.Completion(PROMPT_A, [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]),
    packing.Completion(PROMPT_B, [51, 52, 53]),
    packing.Completion(PROMPT_B, []),
    packing.Completion(PROMPT_B, [61, 62, 63, 64, 65]),
]


def _ordered(lp: torch.Tensor, batch: packing.Batch) -> torch.Tensor:
    at = {m: i for i, m in enumerate(batch.members)}
    return lp[[at[i] for i in range(len(ITEMS))]]


def _scores_and_grads(model, batch):
    model.zero_grad()
    lp = packing.token_logprobs(model, batch)
    weights = torch.linspace(0.5, 1.5, lp.numel()).reshape(lp.shape)  # a loss that weighs every token
    (lp * weights.to(lp)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return _ordered(lp.detach(), batch), grads


LAYOUTS = {"cache": packing.share, "mask": packing.pack}


@pytest.mark.parametrize("layout", ["cache", "mask"])
@pytest.mark.parametrize("name", ["tiny", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_shared_prefix_equals_padded_logprobs_and_gradients(name, layout):
    # fp64, so the check measures the layouts and not the machine: in fp32 the two layouts' sums in other orders
    # differ by 1e-5 relative on one CPU and 1e-4 on another (SmolLM2's 30 layers, other GEMM kernels)
    model, _ = models.load(name, dtype="float64")
    model.train()  # no dropout in these models: train mode only turns autograd bookkeeping on
    shared = LAYOUTS[layout](ITEMS, pad_id=0, budget=4096)
    padded = packing.pad(ITEMS, pad_id=0)
    assert padded.input_ids.shape[0] == 6  # one padded row per answer; the shared layouts run 2 prompts
    lp_s, g_s = _scores_and_grads(model, shared)
    lp_p, g_p = _scores_and_grads(model, padded)
    mask = _ordered(shared.completion_mask, shared)
    assert torch.equal(mask, _ordered(padded.completion_mask, padded))
    assert lp_s.dtype == torch.float64
    # measured: log-probs 3e-14 apart; gradients up to 4.4e-7 relative, because transformers' RMSNorm computes in
    # fp32 even in an fp64 model and the shared layout sums the prompt's gradients before the norm, not after.
    # Real layout errors measured: the answers' positions off by one, 2.6; the prompt's gradient lost, 1.4.
    assert torch.allclose(lp_s * mask, lp_p * mask, atol=1e-9)
    assert g_s.keys() == g_p.keys() and len(g_s) > 0
    for k in g_s:
        rel = float((g_s[k] - g_p[k]).norm() / (g_p[k].norm() + 1e-30))
        assert rel < 1e-5, (k, rel)  # every parameter's gradient, relative to its norm


@pytest.mark.parametrize("layout", ["cache", "mask"])
def test_a_group_over_the_budget_is_split_into_rows_that_score_the_same(layout):
    model, _ = models.load("tiny")
    whole = LAYOUTS[layout](ITEMS, pad_id=0, budget=4096)
    split = LAYOUTS[layout](ITEMS, pad_id=0, budget=len(PROMPT_A) + 10)  # ~1 answer behind each prompt
    rows = (lambda b: len(b.prompts)) if layout == "cache" else (lambda b: b.input_ids.shape[0])
    assert rows(whole) == 2 and rows(split) > rows(whole)
    assert packing.split_group(5, [3, 3, 3, 20], budget=12) == [[0, 1], [2], [3]]  # the long one alone
    with torch.no_grad():
        a = _ordered(packing.token_logprobs(model, whole), whole)
        b = _ordered(packing.token_logprobs(model, split), split)
    assert torch.allclose(a, b, atol=1e-5)
    # no completion token is lost or doubled by the split
    assert int(split.completion_mask.sum()) == sum(len(i.completion_ids) for i in ITEMS)


def test_a_forced_token_carries_no_gradient():
    model, _ = models.load("tiny")
    batch = packing.share(ITEMS[:1], pad_id=0)
    n, vocab = int(batch.completion_mask.sum()), model.config.vocab_size
    allowed = torch.ones((n, vocab), dtype=torch.bool)
    allowed[2] = False
    allowed[2, ITEMS[0].completion_ids[2]] = True  # position 2: one legal token (the grammar forces it)
    lp = packing.token_logprobs(model, batch, allowed=allowed)
    assert lp[0, 2].item() == 0.0
    lp[0, 2].backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    lp[0, 3].backward()  # a free position does move the model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bitmask_unpacking_matches_xgrammar():
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(2, 70)
    bitmask[0] = 0
    bitmask[0, 1] = 1 << 3  # token 35
    bitmask[1, 2] = -(2**31)  # the sign bit of word 2: token 95 is beyond vocab 70, nothing allowed
    out = unpack_bitmask(bitmask, 70)
    assert out.shape == (2, 70) and out[0].nonzero().flatten().tolist() == [35]
    logits = torch.zeros(2, 70)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    assert torch.equal(torch.isfinite(logits[0]), out[0])


def test_guards_never_leave_a_row_without_a_legal_token():
    from icdray.vllm_ext import restrict

    row = torch.tensor([0.0, float("-inf"), 1.0, 2.0])
    assert torch.isfinite(restrict(row.clone(), [2, 1], [])).tolist() == [False, False, True, False]
    assert torch.isfinite(restrict(row.clone(), None, [3])).tolist() == [True, False, True, False]
    assert torch.equal(restrict(row.clone(), [1], []), row)  # only an illegal token allowed: left as it was
    assert torch.equal(restrict(row.clone(), [], []), row)


def test_repeat_guard_bans_only_tokens_that_rewrite_a_code():
    pieces = ["", "E", "7", "8", ".", "5", '"', '"}', "4", "N", "1", "9", "E7", "x"]
    guard = grammar.RepeatGuard(["E78.5", "E78.4", "N17.9", "N17.0"], pieces)
    head = '<answer>\n{"codes": [{"evidence": "HLD", "code": "E78.5"}, {"evidence": "x", "code": "'
    assert guard.banned(head) == []  # E is still open: E78.4 is not written
    assert set(guard.banned(head + "E78.")) == {5}  # "5" would write E78.5 again
    closed = '<answer>\n{"codes": [{"evidence": "a", "code": "E78.5"}, {"evidence": "b", "code": "E78.4"}, '
    field = closed + '{"evidence": "c", "code": "'
    assert set(guard.banned(field)) == {1, 12}  # every E78 code is written: "E" and "E7" lead nowhere new
    assert guard.banned(field + "N1") == []
    assert guard.banned(closed) == []  # outside a code field nothing is banned


BODY = grammar.HEAD + "x" + grammar.MIDDLE + grammar.OPEN


def test_quote_guard_keeps_a_quote_inside_the_note():
    pieces = ["", "ch", "est", " pain", " Pain", "pa", "in", "x", '"', '",', "pain", " ", '"H', '"ch', "<"]
    guard = grammar.QuoteGuard(pieces)
    note = grammar.quote_text(grammar.note_of("Discharge note:\nChest  pain.\nHTN\n\nMedications:\n- x"))
    assert note == "chest pain. htn"
    field = BODY + grammar.ITEM_OPEN
    allowed, banned = guard.rule(note, field)
    assert banned == [] and {pieces[i] for i in allowed} >= {"ch", "pa", "in", " pain", " Pain", "pain", " "}
    assert not {"x", '"', '",', "<"} & {pieces[i] for i in allowed}  # no empty quote, nothing off the note
    allowed, _ = guard.rule(note, field + "Chest")  # case and whitespace aside; a closing token may follow
    assert {pieces[i] for i in allowed} == {" pain", " Pain", " ", '"', '",', '"H', '"ch'}
    allowed, _ = guard.rule(note, field + "chest ")  # " pain" after the space still matches "chest pain"
    assert {" pain", "pa", "pain"} <= {pieces[i] for i in allowed}
    assert guard.rule(note, field + "c") == (
        [],
        [],
    )  # nothing extends "c" here, and "c" is too short to close
    # a token that opens the field and starts the quote is banned when its quote part is not in the note
    assert {pieces[i] for i in guard.rule(note, BODY + grammar.ITEM_OPEN[:-1])[1]} == {'",'}
    assert guard.rule(note, BODY) == (None, [])  # between items nothing is limited
    assert guard.rule(note, grammar.HEAD + '{"evidence": "') == (None, [])  # reasoning is free text


@pytest.fixture(scope="module")
def store(ray_session, demo_root, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grpo-exact"))
    prepare.run(PrepareConfig(max_note_tokens=200, top_k_codes=50), root, demo_root)
    return root


@pytest.mark.slow
def test_constrained_rollouts_are_scored_under_the_samplers_mask(ray_session, store):
    """vLLM samples under the grammar and reports the masked distribution's log-probs; the learner, which
    rebuilds the mask, agrees to < 1e-3 per token. Without the mask it is off by more than 0.1 nats."""
    cfg = load_config(
        None,
        [
            f"storage={store}",
            "grpo.model=tiny",
            "grpo.engine.constrained=true",
            "grpo.engine.no_repeat_codes=true",
            "grpo.engine.note_quotes=true",
            "answer.max_codes=4",
            "answer.max_reasoning_chars=24",
            "answer.max_evidence_chars=12",
            "grpo.learner_threads=2",
        ],
    )
    path = models.resolve("tiny")
    tok = AutoTokenizer.from_pretrained(path)
    notes = layout.read_split(store, "train", ["note", "medications"]).slice(0, 3).to_pylist()
    prompt_ids = [chat.encode_prompt(tok, n["note"], n["medications"], 400) for n in notes]
    ctl = Controller(cfg, path)
    try:
        spec = SamplingSpec(n=4, temperature=1.0, max_tokens=ctl.max_tokens, seed=5)
        groups = ctl.generate(prompt_ids, spec)
        rows = [
            learner.Experience(p, s.token_ids, s.logprobs, 0.0)
            for p, g in zip(prompt_ids, groups, strict=True)
            for s in g
        ]
        # every answer follows the grammar and closes inside its budget
        vocab = AutoConfig.from_pretrained(path).vocab_size
        replay = MaskReplay(tok, ctl.constraint, vocab, chat.eos_ids(tok), note_quotes=True)
        assert all(replay.allowed(r.completion_ids, r.prompt_ids)[1] for r in rows)
        assert all(s.finish_reason == "stop" for g in groups for s in g)
        forced = sum(
            int((replay.allowed(r.completion_ids, r.prompt_ids)[0].sum(-1) == 1).sum()) for r in rows
        )
        assert forced > 0 and any(
            lp == 0.0 for r in rows for lp in r.sampler_logprobs
        )  # forced tokens: log-prob 0
        masked = ray.get(ctl.learners[0].logprobs.remote(rows, True))
        raw = ray.get(ctl.learners[0].logprobs.remote(rows, False))
        gap = max(
            abs(a - b)
            for r, m in zip(rows, masked, strict=True)
            for a, b in zip(r.sampler_logprobs, m, strict=True)
        )
        off = max(
            abs(a - b)
            for r, m in zip(rows, raw, strict=True)
            for a, b in zip(r.sampler_logprobs, m, strict=True)
        )
        assert gap < 1e-3, gap
        assert off > 0.1, off  # why the mask is needed: unmasked scores are another distribution
        # the codes of each answer are all different (the no-repeat guard), and even a random model's quotes
        # are copied from its note (the quote guard)
        shown = [chat.fit_note(tok, n["note"], n["medications"], 400)[0] for n in notes]
        for note, g in zip(shown, groups, strict=True):
            for s in g:
                answer = prompts.parse_answer(s.text)
                assert answer.ok and len(answer.codes) == len(answer.items)
                assert all(evidence.quote_in_note(note, it.evidence) for it in answer.items), s.text
    finally:
        ctl.shutdown()
