"""The README's picture of the MLflow UI: the main job's runs in the compare view, on the numbers a
reader compares them by (peak memory and decode time per token), without the UI's side panels.

    pip install playwright      # drives Debian's chromium (apt-get install chromium); no browser download
    python docs/screenshot.py --store sqlite:///mlruns/mlflow.db   # after `python -m falcon_exp -m bits=4,8`

Starts a real `mlflow server` on the store, opens the latest sweep's children in the compare view,
chooses the parallel-coordinates plot's metrics and writes docs/mlflow-compare.png.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

METRICS = ("memory/peak_rss_gb", "time/decode_ms_per_token")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite:///mlruns/mlflow.db")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "mlflow-compare.png")
    args = parser.parse_args()
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name("falcon-exp").experiment_id
    (parent,) = client.search_runs([experiment], "tags.falcon_exp.sweep_dir LIKE '%'", order_by=["attributes.start_time DESC"], max_results=1)
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.store, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        runs = json.dumps([r.info.run_id for r in sorted(children, key=lambda r: r.info.start_time)])
        url = f"http://127.0.0.1:{port}/#/compare-runs?runs={runs}&experiments={json.dumps([experiment])}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_selector('button[aria-label="Close"]', timeout=60_000)
            page.click('button[aria-label="Close"]')  # the assistant panel
            page.click('button[aria-label="Toggle sidebar"]')
            page.wait_for_function("document.querySelectorAll('[class*=select-selector]').length >= 2", timeout=60_000)
            chosen = page.query_selector_all("[class*=select-selector]")[1]  # the plot's metrics
            for remove in chosen.query_selector_all("[class*=remove]"):
                remove.click()
            for name in METRICS:
                chosen.click()
                page.keyboard.type(name)
                page.locator(f'[class*=select-item-option][title="{name}"]').first.click()
            page.keyboard.press("Escape")
            page.mouse.click(5, 450)  # the select loses focus
            page.wait_for_timeout(1500)
            page.screenshot(path=str(args.out), clip={"x": 0, "y": 0, "width": 1400, "height": 860})
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
