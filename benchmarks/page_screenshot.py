"""A screenshot of the coder page for the docs: serve a checkpoint, code one demo test note, capture.

    python benchmarks/page_screenshot.py --storage artifacts [--checkpoint artifacts/checkpoints/grpo]

Writes docs/img/coder_page.png (the whole page: codes by sequence with confidence, edits, the DRG panel).
Needs headless Chromium (`make setup` installs it) and a finished pipeline run under --storage.
"""

from __future__ import annotations

import argparse
import shutil
import time
import urllib.request
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="artifacts")
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/img/coder_page.png"))
    ap.add_argument("--port", type=int, default=8137)
    a = ap.parse_args()
    import ray
    from playwright.sync_api import sync_playwright
    from ray import serve

    from icdray import layout
    from serve_app.app import build_app

    note = layout.read_split(a.storage, "test", ["note"]).slice(0, 1)["note"][0].as_py()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    checkpoint = a.checkpoint or str(Path(a.storage) / "checkpoints" / "grpo")
    user = {
        "checkpoint": checkpoint,
        "storage": a.storage,
        "max_reasoning_chars": 120,
        "max_evidence_chars": 40,
        "max_codes": 14,
    }
    serve.run(build_app(user), name="page", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{a.port}"
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=5)
            break
        except OSError:
            time.sleep(1)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url + "/")
        page.fill("#note", note)
        page.fill("#age", "72")
        page.select_option("#sex", "F")
        page.fill("#user", "coder")
        page.click("#submit")
        page.wait_for_selector("#drg-number", timeout=300_000)
        rows = page.locator("#codes tbody tr")
        if rows.count() > 2:
            rows.nth(1).locator("button.accept").click()
            rows.nth(2).locator("button.reject").click()
        time.sleep(2)
        page.screenshot(path=a.out, full_page=True)
        browser.close()
    serve.shutdown()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
