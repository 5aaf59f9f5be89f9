"""Mixed load on loopback: searches, API adds and a concurrent CLI add against one archive.

What the fault probe of issue #17 did by hand, as a repeatable run that fails on any error. A
copy of a UC Merced archive (EfficientNet-Lite0 features, the packaged offline weights; the
feature store is shared through ``--cache-dir``) is served by ``landlens serve`` on 127.0.0.1
with a write token; for ``--seconds`` (at most) these run at the same time:

- ``--search-clients`` threads: ``POST /api/search`` with UC Merced files, and ``GET
  /api/search/{id}``, alternately;
- ``--add-clients`` threads: ``POST /api/images`` of new images (UC Merced images with a few
  pixels changed, so their content is new), each with its class;
- one thread running ``landlens index add`` in a subprocess, ``--cli-batches`` times, each with
  ``--cli-batch`` more new images (the writer of another process);
- ``--openers`` threads opening the archive in a loop (``Archive.open``), as the probe's
  readers did while writers committed.

Every request must answer 200/201 and every open must succeed. Afterwards the archive must be
consistent: it opens; its image count is the start count plus every acknowledged add; every
added image is found first by its own file at distance 0; the catalog, vectors and index agree
(checked by opening); no generation but the live one and no unreferenced upload is left; and
``uploads/`` holds exactly the API-added files. The script exits non-zero otherwise.

Usage:
    python benchmarks/service_mixed.py [--seconds 60] [--out benchmarks/results/service_mixed]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import REPO, UCM, _free_port, _multipart, _wait_healthy  # noqa: E402

TOKEN = "mixed-load-token"


def _new_images(files: list[Path], n: int, out: Path, seed: int, tag: str) -> list[tuple[Path, str]]:
    """``n`` PNGs whose content no archive image has: UC Merced images with a seeded patch changed."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        src = files[int(rng.integers(len(files)))]
        arr = np.array(Image.open(src).convert("RGB"))
        y, x = (int(v) for v in rng.integers(0, 200, 2))
        arr[y:y + 8, x:x + 8] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        dest = out / src.parent.name / f"{tag}_{i:04d}.png"
        dest.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(dest)
        made.append((dest, src.parent.name))
    return made


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=UCM)
    ap.add_argument("--template", type=Path, default=REPO / "runs" / "bench" / "service_archive_ucm",
                    help="archive to copy (built from --data when missing); the copy is what gets written")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "service_mixed")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "features")
    ap.add_argument("--seconds", type=float, default=60.0, help="upper bound on the mixed phase")
    ap.add_argument("--search-clients", type=int, default=3)
    ap.add_argument("--add-clients", type=int, default=2)
    ap.add_argument("--adds-per-client", type=int, default=20)
    ap.add_argument("--cli-batches", type=int, default=3)
    ap.add_argument("--cli-batch", type=int, default=5)
    ap.add_argument("--openers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "service_mixed")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    from landlens.retrieval.archive import Archive, is_archive
    from landlens.retrieval.generations import sha256_file

    if not is_archive(args.template):
        Archive.build(args.data, args.template, cache_dir=args.cache_dir)
    if args.work.exists():
        shutil.rmtree(args.work)
    arch_dir = args.work / "archive"
    shutil.copytree(args.template, arch_dir, ignore=shutil.ignore_patterns("features"))
    start = Archive.open(arch_dir)
    n0 = len(start)
    recs = start.records()
    files = [Path(r.path) for r in recs]
    ids = [r.id for r in recs]
    api_new = _new_images(files, args.add_clients * args.adds_per_client, args.work / "api", args.seed, "api")
    cli_new = _new_images(files, args.cli_batches * args.cli_batch, args.work / "cli", args.seed + 1, "cli")

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LANDLENS_TOKEN": TOKEN}
    log = open(args.work / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "landlens.cli.main", "serve", str(arch_dir), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    lock = threading.Lock()
    counts = {"search": 0, "by_id": 0, "api_add": 0, "cli_add": 0, "opens": 0}
    errors: list[str] = []
    added_api: list[tuple[Path, int]] = []
    added_cli: list[Path] = []
    stop = threading.Event()

    def fail(what: str, exc: Any) -> None:
        with lock:
            errors.append(f"{what}: {exc}"[:240])

    def searcher(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = 0
        while not stop.is_set():
            try:
                if i % 2 == 0:
                    body, ctype = _multipart(files[rng.randrange(len(files))], {"k": "10"})
                    conn.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
                    key = "search"
                else:
                    conn.request("GET", f"/api/search/{ids[rng.randrange(len(ids))]}?k=10")
                    key = "by_id"
                r = conn.getresponse()
                data = r.read()
                if r.status != 200 or len(json.loads(data)["results"]) != 10:
                    raise RuntimeError(f"HTTP {r.status}: {data[:120]!r}")
                with lock:
                    counts[key] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                fail("search", exc)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            i += 1
        conn.close()

    def adder(items: list[tuple[Path, str]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for path, cls in items:
            if stop.is_set():
                break
            try:
                body, ctype = _multipart(path, {"class": cls})
                conn.request("POST", "/api/images", body=body,
                             headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 201:
                    raise RuntimeError(f"HTTP {r.status}: {data[:160]!r}")
                with lock:
                    counts["api_add"] += 1
                    added_api.append((path, int(json.loads(data)["id"])))
            except Exception as exc:  # noqa: BLE001
                fail("api add", exc)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.close()

    def cli_adder() -> None:
        for b in range(args.cli_batches):
            if stop.is_set():
                break
            batch = cli_new[b * args.cli_batch:(b + 1) * args.cli_batch]
            res = subprocess.run([sys.executable, "-m", "landlens.cli.main", "index", "add", str(arch_dir),
                                  *[str(p) for p, _ in batch], "--class-from-folder", "--json"],
                                 capture_output=True, text=True, env=env, timeout=600)
            if res.returncode != 0:
                fail("cli add", res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode)
                continue
            with lock:
                counts["cli_add"] += len(json.loads(res.stdout)["added"])
                added_cli.extend(p for p, _ in batch)

    def opener() -> None:
        while not stop.is_set():
            try:
                Archive.open(arch_dir)
                with lock:
                    counts["opens"] += 1
            except Exception as exc:  # noqa: BLE001
                fail("open", exc)

    t0 = time.perf_counter()
    try:
        health = _wait_healthy(port, proc)
        writers = [threading.Thread(target=adder, args=(api_new[c::args.add_clients],))
                   for c in range(args.add_clients)] + [threading.Thread(target=cli_adder)]
        readers = [threading.Thread(target=searcher, args=(args.seed + c,)) for c in range(args.search_clients)]
        readers += [threading.Thread(target=opener) for _ in range(args.openers)]
        t1 = time.perf_counter()
        for t in writers + readers:
            t.start()
        deadline = t1 + args.seconds
        for t in writers:
            t.join(max(0.0, deadline - time.perf_counter()))
        stop.set()
        for t in writers + readers:
            t.join(600)
        mixed_s = time.perf_counter() - t1
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    # ---------------------------------------------------------------- consistency afterwards
    checks: dict[str, bool] = {}
    final = Archive.open(arch_dir)  # opening checks catalog rows == vectors == index entries
    checks["image count = start + acknowledged adds"] = len(final) == n0 + len(added_api) + len(added_cli)
    checks["ids unique"] = len({r.id for r in final.records()}) == len(final)
    found_first = 0
    for path in [p for p, _ in added_api] + added_cli:
        hits = final.search(path, k=1)
        found_first += bool(hits) and hits[0].distance < 1e-4 and hits[0].record.sha256 == sha256_file(path)[0]
    checks["every added image found first by its own file"] = found_first == len(added_api) + len(added_cli)
    live = [p.name for p in arch_dir.iterdir() if p.name.startswith("gen-") or p.name.startswith(".gen-")]
    checks["only the live generation on disk"] = live == [f"gen-{final.generation:08d}"]
    uploads = sorted(p.name for p in (arch_dir / "uploads").iterdir()) if (arch_dir / "uploads").is_dir() else []
    api_shas = sorted(final.record(i).sha256 for _, i in added_api)
    checks["uploads/ holds exactly the API-added images"] = sorted(Path(u).stem for u in uploads) == api_shas
    checks["no request or open failed"] = not errors
    ok = all(checks.values())

    import torch

    doc = {
        "command": "python benchmarks/service_mixed.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "archive": {"start_images": n0, "end_images": len(final), "end_generation": final.generation,
                    "backbone": final.backbone_name},
        "server": {"command": "landlens serve ARCHIVE --port PORT (token from $LANDLENS_TOKEN)", "health": health},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mixed_phase_s": round(mixed_s, 1), "total_s": round(time.perf_counter() - t0, 1),
        "counts": counts, "errors": len(errors), "error_examples": sorted(set(errors))[:5],
        "checks": checks, "ok": ok,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Mixed load on loopback ({'passed' if ok else 'FAILED'})", "", f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs, torch {doc['machine']['torch']}; "
             f"clients, CLI writer and server share the CPUs.", "",
             f"Archive: UC Merced, {n0} -> {len(final)} images ({final.backbone_name}), generation "
             f"{final.generation}; mixed phase {mixed_s:.1f} s.", "",
             "| operation | done |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", f"Errors: {len(errors)}", "", "| check afterwards | result |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in checks.items()]
    if errors:
        lines += ["", "Error examples:", *[f"- `{e}`" for e in doc["error_examples"]]]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not ok:
        raise SystemExit("service_mixed: failed (see the checks above)")


if __name__ == "__main__":
    main()
