"""Load benchmark of the search service on loopback: concurrent clients searching an archive.

Builds (or reuses) an archive of the UC Merced images in ``../shared/data`` with
EfficientNet-Lite0 features (the packaged offline weights; the feature store is shared with the
other benchmarks through ``--cache-dir``), starts ``landlens serve`` on 127.0.0.1 in its own
process, and runs, for each concurrency level in ``--clients``, that many client threads,
each with one keep-alive HTTP connection, issuing requests until ``--requests`` requests are done
or ``--seconds`` have passed (whichever comes first):

- ``upload``: ``POST /api/search`` with a UC Merced image file as the multipart upload (the
  images cycle through a seeded shuffle of the archive, so repeated bytes are rare), k = 12;
- ``by-id``: ``GET /api/search/{id}`` (no forward pass: shows the cost of everything else).

Per level it reports client-side latency (p50/p99, from sending the request to reading the
whole response over loopback), throughput, the error count (any status other than 200 or a
malformed body), and the server's own timings from each response's ``timing_ms``
(decode, embed, search, total: the time spent inside the app, excluding the network and HTTP
parsing). Results go to ``--out``.{md,json}.

Usage:
    python benchmarks/service_load.py [--data ../shared/data/UCMerced_LandUse] [--clients 1 4 8]
        [--requests 300] [--seconds 90] [--out benchmarks/results/service_load]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
UCM = REPO.parent / "shared" / "data" / "UCMerced_LandUse"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _multipart(path: Path, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/api/health")
            r = c.getresponse()
            body = r.read()
            if r.status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def _run_level(port: int, mode: str, clients: int, requests: int, seconds: float, files: list[Path],
               ids: list[int], k: int) -> dict[str, Any]:
    lock = threading.Lock()
    counter = {"next": 0}
    lat: list[float] = []
    server: list[dict[str, float]] = []
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    def take() -> int | None:
        with lock:
            i = counter["next"]
            if i >= requests or time.monotonic() > stop_at:
                return None
            counter["next"] = i + 1
            return i

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while (i := take()) is not None:
            try:
                if mode == "upload":
                    body, ctype = _multipart(files[i % len(files)], {"k": str(k)})
                    t0 = time.perf_counter()
                    conn.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
                else:
                    t0 = time.perf_counter()
                    conn.request("GET", f"/api/search/{ids[i % len(ids)]}?k={k}")
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t0
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data[:120]!r}")
                doc = json.loads(data)
                if len(doc["results"]) != k:
                    raise RuntimeError(f"{len(doc['results'])} results for k={k}")
                with lock:
                    lat.append(dt)
                    server.append(doc.get("timing_ms") or {})
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3

    def pct(values: list[float] | np.ndarray, q: float) -> float | None:
        return float(np.percentile(values, q)) if len(values) else None

    srv = {key: [float(s[key]) for s in server if key in s] for key in ("decode", "embed", "search", "total")}
    return {
        "mode": mode, "clients": clients, "requests": len(lat) + len(errors), "ok": len(lat),
        "errors": len(errors), "error_examples": sorted(set(errors))[:5], "wall_s": wall,
        "throughput_rps": len(lat) / wall if wall > 0 else None,
        "latency_ms": {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "max": float(ms.max()) if len(ms) else None},
        "server_ms": {key: {"p50": pct(v, 50), "p99": pct(v, 99)} for key, v in srv.items()},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=UCM)
    ap.add_argument("--archive", type=Path, default=REPO / "runs" / "bench" / "service_archive_ucm")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "features")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["upload", "by-id"], choices=["upload", "by-id"])
    ap.add_argument("--requests", type=int, default=300, help="requests per level (upper bound)")
    ap.add_argument("--seconds", type=float, default=90, help="time per level (upper bound)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimize", choices=["jit", "compile", "none"], default="jit",
                    help="the server's forward pass (landlens serve --optimize)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "service_load")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    from landlens.retrieval.archive import Archive, is_archive

    t0 = time.perf_counter()
    if is_archive(args.archive):
        arch = Archive.open(args.archive)
    else:
        arch = Archive.build(args.data, args.archive, backbone=args.backbone, cache_dir=args.cache_dir)
    build_s = time.perf_counter() - t0
    recs = arch.records()
    rng = random.Random(args.seed)
    order = list(range(len(recs)))
    rng.shuffle(order)
    files = [Path(recs[i].path) for i in order]
    ids = [recs[i].id for i in order]

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LANDLENS_TOKEN", None)
    cmd = [sys.executable, "-m", "landlens.cli.main", "serve", str(args.archive), "--port", str(port),
           "--optimize", args.optimize]
    log = open(args.out.with_suffix(".server.log"), "w") if args.out.parent.is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    levels = []
    try:
        t1 = time.perf_counter()
        health = _wait_healthy(port, proc)
        startup_s = time.perf_counter() - t1
        for mode in args.modes:
            _run_level(port, mode, 1, args.warmup, 60, files, ids, args.k)  # warm-up, not reported
            for c in args.clients:
                res = _run_level(port, mode, c, args.requests, args.seconds, files, ids, args.k)
                levels.append(res)
                lm, sm = res["latency_ms"], res["server_ms"]["total"]
                print(f"{mode:7s} clients={c}: {res['ok']} ok, {res['errors']} errors, "
                      f"{res['throughput_rps']:.1f} req/s, client p50 {lm['p50']:.1f} ms p99 {lm['p99']:.1f} ms, "
                      f"server total p50 {sm['p50']:.1f} ms", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    import torch

    doc = {
        "command": "python benchmarks/service_load.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "archive": {"path": str(args.archive), "images": len(arch), "backbone": arch.backbone_name,
                    "index": arch.factory, "build_or_open_s": build_s},
        "server": {"command": f"landlens serve ARCHIVE --port PORT --optimize {args.optimize}",
                   "startup_s": startup_s, "health": health},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": {"k": args.k, "requests_per_level": args.requests, "seconds_per_level": args.seconds,
                     "warmup": args.warmup, "seed": args.seed},
        "levels": levels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(doc))
    print(f"wrote {args.out.with_suffix('.md')}")
    failed = sum(r["errors"] for r in levels)
    if failed:  # the results are written either way; a load run with errors is a failed run
        raise SystemExit(f"service_load: {failed} request(s) failed (see the error examples in {args.out.with_suffix('.md')})")


def _markdown(doc: dict[str, Any]) -> str:
    a = doc["archive"]
    lines = [
        "# Search service under load (loopback)",
        "",
        f"`{doc['command']}`",
        "",
        f"Archive: {a['images']} UC Merced images, {a['backbone']} features, FAISS `{a['index']}`; server "
        f"`{doc['server']['command']}` in its own process on 127.0.0.1 (started and healthy in "
        f"{doc['server']['startup_s']:.1f} s, model and index loaded once; forward pass: "
        f"{doc['server']['health'].get('forward', 'eager')}). Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs, "
        f"torch {doc['machine']['torch']}; the clients run on the same 2 cores as the server.",
        "",
        "Client latency is from sending the request to reading the whole response; server timings are the "
        "app's own `timing_ms` (decode, embed = the backbone's forward pass, search = FAISS + catalog, total), "
        "without the network and HTTP parsing. `upload` posts an image file (multipart, k = "
        f"{doc['settings']['k']}); `by-id` searches with an indexed image (no forward pass). Each level stops at "
        f"{doc['settings']['requests_per_level']} requests or {doc['settings']['seconds_per_level']:.0f} s.",
        "",
        "| mode | clients | requests | errors | throughput (req/s) | client p50 (ms) | client p99 (ms) | "
        "server total p50 / p99 (ms) | decode p50 | embed p50 | search p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for r in doc["levels"]:
        s = r["server_ms"]
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['errors']} | {f(r['throughput_rps'])} | "
                     f"{f(r['latency_ms']['p50'])} | {f(r['latency_ms']['p99'])} | {f(s['total']['p50'])} / "
                     f"{f(s['total']['p99'])} | {f(s['decode']['p50'])} | {f(s['embed']['p50'])} | {f(s['search']['p50'])} |")
    errs = [e for r in doc["levels"] for e in r["error_examples"]]
    lines += ["", f"Errors: {sum(r['errors'] for r in doc['levels'])}" + (f" ({'; '.join(errs)})" if errs else ""), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
