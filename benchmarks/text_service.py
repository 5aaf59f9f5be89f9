"""Search by words through the service, on loopback: text-query latency and a page screenshot.

A UC Merced archive (EfficientNet-Lite0 features, packaged offline weights; built through the
shared feature cache) gets an image-text alignment trained with ``landlens retrieval align``'s
defaults on the UCM-captions train split (or ``--alignment``), attached with ``landlens index
text``; ``landlens serve`` runs on 127.0.0.1. Then:

- ``--queries`` text queries (the distinct sentences of the test split, in file order), one at a
  time (``POST /api/search/text``, k=12): client-side latency p50/p90/p99 and the server's
  ``timing_ms`` (text encoding and the scan of the projected vectors);
- the same queries from ``--clients`` threads at once: throughput and latency;
- headless Chromium (``/usr/bin/chromium`` via Playwright) types ``--sentence`` into the page's
  text box and the answer is screenshotted.

Usage:
    python benchmarks/text_service.py [--queries 200] [--clients 4]
        [--sentence "many boats are docked in a harbor"] [--out benchmarks/results/text_service]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import REPO, UCM, _free_port, _wait_healthy  # noqa: E402


def _post_text(port: int, sentence: str, k: int) -> tuple[float, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"text": sentence, "k": k})
    t = time.perf_counter()
    conn.request("POST", "/api/search/text", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    ms = (time.perf_counter() - t) * 1000
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"POST /api/search/text answered {resp.status}: {data[:200]!r}")
    return ms, json.loads(data)


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": int(len(a)), "p50": round(float(np.percentile(a, 50)), 1), "p90": round(float(np.percentile(a, 90)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "mean": round(float(a.mean()), 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", type=Path, default=REPO / "runs" / "bench" / "text_archive_ucm")
    ap.add_argument("--alignment", type=Path, default=None, help="default: train one with align's defaults")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "features")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--sentence", default="many boats are docked in a harbor")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "text_service")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from landlens.data.captions import read_captions
    from landlens.retrieval.archive import Archive
    from landlens.retrieval.textstudy import align_text

    t0 = time.perf_counter()
    Archive.build(UCM, args.archive, backbone="tf_efficientnet_lite0", weights="package", cache_dir=args.cache_dir,
                  overwrite=True, progress=False)
    alignment = args.alignment
    report = None
    if alignment is None:
        alignment = args.archive.parent / "text_archive_ucm.alignment.safetensors"
        _, report = align_text(UCM, UCM / "captions.json", alignment, backbones="tf_efficientnet_lite0", weights="package",
                          cache_dir=args.cache_dir)
    Archive.open(args.archive).enable_text(alignment)
    sentences = list(dict.fromkeys(s for c in read_captions(UCM / "captions.json") if c.split == "test"
                                   for s in c.sentences))[:args.queries]

    port = _free_port()
    cmd = [sys.executable, "-m", "landlens.cli.main", "serve", str(args.archive), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        health = _wait_healthy(port, proc)
        assert health.get("text") is True, health
        for s in sentences[:5]:  # warm-up, not counted
            _post_text(port, s, args.k)
        serial, server = [], {"search": []}
        for s in sentences:
            ms, body = _post_text(port, s, args.k)
            serial.append(ms)
            server["search"].append(body["timing_ms"]["search"])
        lat: list[float] = []
        lock = threading.Lock()
        todo = list(sentences)

        def client() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    s = todo.pop()
                ms, _ = _post_text(port, s, args.k)
                with lock:
                    lat.append(ms)

        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        shot = _screenshot(port, args.sentence, args.out.with_suffix(".png"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    doc = {"command": "python benchmarks/text_service.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "archive": str(args.archive), "images": health["images"], "alignment": str(alignment),
           "align_report": report, "queries": len(sentences), "serial_ms": _stats(serial),
           "server_search_ms": _stats(server["search"]),
           "concurrent": {"clients": args.clients, **_stats(lat), "queries_per_second": round(len(lat) / wall, 1)},
           "screenshot": shot, "sentence": args.sentence, "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    s, c, v = doc["serial_ms"], doc["concurrent"], doc["server_search_ms"]
    md = ["# Search by words through the service (loopback, CPU)", "", f"Command: `{doc['command']}`", "",
          f"UC Merced archive ({doc['images']} images, EfficientNet-Lite0 packaged weights) with an alignment of "
          f"`landlens retrieval align` (defaults) attached; `landlens serve` on 127.0.0.1, {doc['cpus']} CPUs; "
          f"{doc['queries']} distinct sentences of the UCM-captions test split, k={args.k}.", "",
          "| requests | p50 ms | p90 ms | p99 ms | mean ms | queries/s |", "|---|---:|---:|---:|---:|---:|",
          f"| one at a time (client-side) | {s['p50']} | {s['p90']} | {s['p99']} | {s['mean']} | - |",
          f"| {c['clients']} clients at once | {c['p50']} | {c['p90']} | {c['p99']} | {c['mean']} | {c['queries_per_second']} |",
          f"| server `timing_ms.search` (text encoding + scan), one at a time | {v['p50']} | {v['p90']} | {v['p99']} | "
          f"{v['mean']} | - |", "",
          f"Screenshot: the page answering \"{args.sentence}\" (`{Path(shot).name}`).", "",
          f"Wall time {doc['seconds']} s (archive build from the feature cache, alignment training, serving)."]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _screenshot(port: int, sentence: str, out: Path) -> str:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("LANDLENS_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#text-form:not([hidden])")
        page.fill("#text-query", sentence)
        with page.expect_response(lambda r: r.url.endswith("/api/search/text")):
            page.click("#text-submit")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return str(out)


if __name__ == "__main__":
    main()
