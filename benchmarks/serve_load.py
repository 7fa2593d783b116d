"""Closed-loop load on the served coder: requests/s and p50/p99 latency, continuous vs static batching.

    python benchmarks/serve_load.py --clients 1 8 32 --seconds 40

Serves `--model` (default smollm2-135m, vLLM engine, constrained decoding) on a local Ray instance
twice: `batching=continuous` (vLLM's async engine: a request joins the running batch at the next decode
step) and `batching=static` (`@serve.batch` up to 32 requests around one blocking generate call: a
request waits for the batch in flight). For each client count a separate load process runs N
closed-loop clients (each sends the next request when its answer arrives) for `--seconds`, on
synthetic demo notes, and reports requests/s and latency percentiles.
Target: at 32 clients, continuous p50 <= 0.5x static's with requests/s no lower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request


def load(url: str, clients: int, seconds: float, notes: list[str]) -> dict[str, float]:
    """Run `clients` closed-loop clients against url for `seconds` (this is the load process)."""
    latencies: list[float] = []
    errors = [0]
    stop = time.time() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while time.time() < stop:
            body = json.dumps({"note": notes[i % len(notes)]}).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            t = time.time()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
                with lock:
                    latencies.append(time.time() - t)
            except OSError:
                with lock:
                    errors[0] += 1
            i += clients

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {
        "requests": len(lat),
        "errors": errors[0],
        "rps": len(lat) / wall,
        "p50_s": pct(0.5),
        "p99_s": pct(0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--load", help=argparse.SUPPRESS)  # internal: run as the load process
    args = ap.parse_args()
    if args.load:
        spec = json.loads(args.load)
        print(json.dumps(load(spec["url"], spec["clients"], spec["seconds"], spec["notes"])))
        return

    import ray
    from ray import serve

    from icdray import metrics
    from serve_app.app import _example, build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    notes = [_example(i)["note"][:2500] for i in range(16)]
    rows = {}
    modes = ("continuous", "static")
    for mode in modes:
        user = {
            "checkpoint": args.model,
            "batching": mode,
            "max_batch_size": 32,
            "batch_wait_timeout_s": 0.05,
            "max_new_tokens": args.max_new_tokens,
            "max_reasoning_chars": 200,
            "max_evidence_chars": 60,
            "max_prompt_tokens": 1024,
            "max_codes": 8,
            "engine": {"backend": "vllm", "threads_bind": "0-1", "kv_cache_gb": 2},
        }
        serve.run(build_app(user), name="bench", route_prefix="/", blocking=False)
        url = "http://127.0.0.1:8123"
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=5)
                break
            except OSError:
                time.sleep(1)
        warm = {"url": url + "/v1/code", "clients": 2, "seconds": 5, "notes": notes}
        subprocess.run(
            [sys.executable, __file__, "--load", json.dumps(warm)], check=True, capture_output=True
        )
        for clients in args.clients:
            spec = {"url": url + "/v1/code", "clients": clients, "seconds": args.seconds, "notes": notes}
            out = subprocess.run(
                [sys.executable, __file__, "--load", json.dumps(spec)],
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows[f"{mode}, {clients} clients"] = result
            print(f"{mode}, {clients} clients: {result}", flush=True)
        serve.delete("bench")
    print(f"\n{args.model}, vLLM engine, constrained decoding (bounds 200/60/8), 1 replica, 2 CPU cores\n")
    print(metrics.format_table(rows, ("requests", "errors", "rps", "p50_s", "p99_s")))
    for clients in args.clients:
        c, s = rows[f"continuous, {clients} clients"], rows[f"static, {clients} clients"]
        print(
            f"{clients} clients: continuous/static requests/s x{c['rps'] / s['rps']:.2f}, "
            f"p50 x{c['p50_s'] / s['p50_s']:.2f} ({c['p50_s']:.1f}s vs {s['p50_s']:.1f}s), "
            f"p99 {c['p99_s']:.1f}s vs {s['p99_s']:.1f}s"
        )


if __name__ == "__main__":
    main()
