"""GPU checks (marked `gpu`, skipped without CUDA). Run them on a GPU machine with the GPU environment
(`bash cluster/install.sh gpu --dev`), or through `benchmarks/gpu_smoke.sh`.

The first two need only torch and transformers (a machine without Ray, vLLM or DeepSpeed runs them):
the learner's shared-prefix scoring on CUDA equals the padded one, and its bf16 log-prob and loss path
is finite and close to fp32. The others need the whole GPU stack: a DeepSpeed SFT step, a GRPO step with
vLLM on CUDA and the NCCL weight broadcast, and a Serve request on a GPU replica.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _tiny_cuda(dtype: torch.dtype = torch.float32):
    from icdray import models

    model = models.load("tiny")[0].to("cuda", dtype)
    model.eval()
    return model


def _items():
    from icdray.grpo import packing

    a, b = list(range(200, 300)), list(range(300, 340))
    return [
        packing.Completion(a, [11, 12, 13, 14, 15]),
        packing.Completion(a, [21, 22]),
        packing.Completion(a, [31, 32, 33, 34, 35, 36, 37, 38]),
        packing.Completion(b, [51, 52, 53]),
        packing.Completion(b, [61]),
    ]


def _ordered(lp, batch):
    at = {m: i for i, m in enumerate(batch.members)}
    return lp[[at[i] for i in range(len(batch.members))]]


@pytest.mark.parametrize("layout", ["cache", "mask"])
def test_shared_prefix_equals_padded_on_cuda(layout):
    from icdray.grpo import packing

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _tiny_cuda()
    items = _items()
    share = packing.share if layout == "cache" else packing.pack
    shared = packing.to_device(share(items, pad_id=0), "cuda")
    padded = packing.to_device(packing.pad(items, pad_id=0), "cuda")
    with torch.no_grad():
        a = _ordered(packing.token_logprobs(model, shared), shared)
        b = _ordered(packing.token_logprobs(model, padded), padded)
    mask = _ordered(shared.completion_mask, shared).bool()
    assert torch.allclose(a[mask], b[mask], atol=1e-4), (a[mask] - b[mask]).abs().max()


def test_bf16_logprobs_and_loss_are_finite_and_close_to_fp32():
    from icdray.grpo import algo, packing

    items = _items()
    batch = packing.to_device(packing.share(items, pad_id=0), "cuda")
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        full = packing.token_logprobs(_tiny_cuda(), batch)
    model = _tiny_cuda(torch.bfloat16)
    model.train()
    lp = packing.token_logprobs(model, batch)
    assert torch.isfinite(lp[mask]).all()
    assert (lp.float()[mask] - full[mask]).abs().mean() < 0.05  # bf16 rounding, not a different model
    adv = torch.linspace(-1, 1, lp.shape[0], device="cuda")
    loss = algo.policy_loss(lp.float(), full.detach(), adv, batch.completion_mask.float()).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def store(ray_session, demo_root, tmp_path_factory):
    from icdray import distill, prepare
    from icdray.config import PrepareConfig, load_config

    root = str(tmp_path_factory.mktemp("gpu-store"))
    prepare.run(PrepareConfig(max_note_tokens=250), root, demo_root)
    distill.run(load_config(None, [f"storage={root}", "teacher.limit=16"]))
    return root


@pytest.mark.slow
def test_deepspeed_sft_step_on_gpu(store, tmp_path):
    pytest.importorskip("deepspeed")
    from icdray import sft
    from icdray.config import load_config

    cfg = load_config(
        None,
        [
            f"storage={store}",
            "sft.model=tiny",
            "sft.use_gpu=true",
            "sft.dtype=bfloat16",
            "sft.num_workers=1",
            "sft.limit=8",
            "sft.max_steps=2",
            "sft.grad_accum=1",
            "sft.val_fraction=0",
        ],
    )
    result = sft.run(cfg, output=str(tmp_path / "sft"), run_name="gpu-sft")
    assert result.steps == 2 and 0 < result.last_loss < 1e4
    print(f"SFT on GPU: {result.tokens_per_s:.0f} tokens/s")


@pytest.mark.slow
def test_grpo_step_with_vllm_on_cuda_and_nccl_broadcast(store):
    pytest.importorskip("vllm")
    import ray

    from icdray import models
    from icdray.config import load_config
    from icdray.engine import SamplingSpec
    from icdray.grpo import learner, loop

    cfg = load_config(
        None,
        [
            f"storage={store}",
            "grpo.model=tiny",
            "grpo.lora=false",
            "grpo.lr=1e-2",
            "grpo.use_gpu=true",
            "grpo.dtype=float32",
            "grpo.engine.device=cuda",
            "grpo.engine.constrained=false",
            "grpo.engine.gpu_memory_utilization=0.3",
            "grpo.rollout_gpus=0.4",
            "grpo.learner_gpus=0.5",  # both on one GPU
            "grpo.weight_sync=broadcast",
            "grpo.weight_backend=nccl",
        ],
    )
    ctl = loop.Controller(cfg, models.resolve("tiny"))
    try:
        prompts = [list(range(100, 400)), list(range(100, 200))]
        spec = SamplingSpec(n=4, temperature=1.0, max_tokens=12, seed=1)

        def rows():
            groups = ctl.generate(prompts, spec)
            return [
                learner.Experience(p, s.token_ids, s.logprobs, 1.0 if k % 2 else -1.0)
                for p, g in zip(prompts, groups, strict=True)
                for k, s in enumerate(g)
            ]

        def gap(rs):
            mine = ray.get(ctl.learners[0].logprobs.remote(rs))
            return max(
                abs(a - b)
                for r, lp in zip(rs, mine, strict=True)
                for a, b in zip(r.sampler_logprobs, lp, strict=True)
            )

        first = rows()
        assert gap(first) < 1e-2
        ctl.update(first)
        seconds = ctl.sync(1)
        assert gap(rows()) < 1e-2, "the NCCL broadcast left the engine behind the learner"
        print(f"NCCL weight sync: {seconds:.2f} s")
    finally:
        ctl.shutdown()


@pytest.mark.slow
def test_serve_request_on_a_gpu_replica(store):
    pytest.importorskip("vllm")
    from ray import serve

    from serve_app.app import build_app

    port = 8011
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = {"backend": "vllm", "device": "cuda", "dtype": "bfloat16", "gpu_memory_utilization": 0.3}
    app = build_app(
        {"checkpoint": "tiny", "storage": store, "engine": engine, "max_codes": 3},
        ray_actor_options={"num_cpus": 1, "num_gpus": 0.4},
    )
    serve.run(app, name="coder-gpu", route_prefix="/gpu", blocking=False)
    try:
        body = json.dumps({"note": "History of hypertension. Treated for pneumonia."}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/gpu/v1/code", body, {"Content-Type": "application/json"}
        )
        for _ in range(60):
            try:
                out = json.loads(urllib.request.urlopen(req, timeout=120).read())
                break
            except OSError:
                import time

                time.sleep(5)
        assert "codes" in out and out["request_id"]
    finally:
        serve.delete("coder-gpu")
