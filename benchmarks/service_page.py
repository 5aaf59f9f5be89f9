"""Screenshot of the web page searching the real UC Merced archive (for the README).

Starts ``landlens serve`` on the archive that ``benchmarks/service_load.py`` builds (UC Merced,
EfficientNet-Lite0 features) with a trained classifier run (default: the fine-tuned UC Merced
run of ``benchmarks/classification.py``), uploads one UC Merced image in headless Chromium
(``/usr/bin/chromium`` via Playwright), and writes a desktop and a phone screenshot.

Usage:
    python benchmarks/service_page.py [--archive runs/bench/service_archive_ucm]
        [--run runs/bench/ucm_full] [--query ../shared/data/UCMerced_LandUse/Images/harbor/harbor42.jpg]
        [--out benchmarks/results/service_page]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import REPO, UCM, _free_port, _wait_healthy  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", type=Path, default=REPO / "runs" / "bench" / "service_archive_ucm")
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "bench" / "ucm_full")
    ap.add_argument("--query", type=Path, default=UCM / "Images" / "harbor" / "harbor42.jpg")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "service_page")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    port = _free_port()
    cmd = [sys.executable, "-m", "landlens.cli.main", "serve", str(args.archive), "--port", str(port)]
    if args.run and args.run.is_dir():
        cmd += ["--run", str(args.run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(port, proc)
        # upload a PNG copy (same pixels), so the page can preview any query format, TIFF included
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            query = Path(tmp) / (args.query.stem + ".png")
            Image.open(args.query).convert("RGB").save(query)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=os.environ.get("LANDLENS_CHROMIUM", "/usr/bin/chromium"),
                                            args=["--no-sandbox"])
                for name, viewport in (("", {"width": 1280, "height": 900}), ("-mobile", {"width": 390, "height": 844})):
                    page = browser.new_page(viewport=viewport, device_scale_factor=1)
                    page.goto(f"http://127.0.0.1:{port}/")
                    page.fill("#k", str(args.k))
                    page.set_input_files("#file-input", str(query))
                    page.wait_for_function(f"() => document.querySelectorAll('#results .result').length === {args.k}")
                    page.wait_for_function("() => [...document.querySelectorAll('#results img')]"
                                           ".every(i => i.complete && i.naturalWidth > 0)")
                    out = args.out.parent / f"{args.out.name}{name}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(out), full_page=True)
                    print(f"wrote {out}: {page.inner_text('#status')}")
                browser.close()
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
