"""Peak memory of the search service under bursts of big-image work (thumbnails and uploads).

Generates a small archive (``lbp_rgb`` features: no weights needed) of a few 64 px images and
one big PNG (``--side`` x ``--side`` px, a gradient with noise: 49 megapixels by default), then,
for each case, starts ``landlens serve`` on 127.0.0.1 in a fresh process, warms it up with one
small request, and fires one burst of concurrent requests:

- ``thumbnails``: ``--concurrency`` concurrent ``GET /api/images/{big}/thumbnail`` of
  differing ``size`` values (64 ... 512);
- ``uploads``: ``--concurrency`` concurrent ``POST /api/search`` of a PNG of ``--side`` x
  ``--side`` px that compresses to a few hundred KiB (a flat image with a faint pattern: many
  pixels, few bytes).

For each case it reports the server's resident memory after the warm-up (``VmRSS``), its peak
over the whole life of the process (``VmHWM`` from ``/proc/PID/status``, read after the burst),
the growth (peak - warm), the statuses, and the latency of each request. The server runs the
code in ``--src`` (default: this checkout's ``src``), so the same script measures an older
checkout of the package. Results go to ``--out``.{md,json}.

Usage:
    python benchmarks/service_memory.py [--side 7000] [--concurrency 8] [--src src]
        [--out benchmarks/results/service_memory]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
THUMBNAIL_SIZES = (64, 96, 128, 160, 200, 256, 384, 512)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _big_png(path: Path, side: int, seed: int) -> None:
    """A ``side`` x ``side`` RGB PNG: colour gradients plus noise (compresses poorly; a real photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    img = np.empty((side, side, 3), np.uint8)
    for c in range(3):  # row blocks keep the temporary arrays small
        for r0 in range(0, side, 1000):
            r1 = min(side, r0 + 1000)
            base = ramp[None, :] if c != 1 else ramp[r0:r1, None]
            block = np.broadcast_to(base, (r1 - r0, side)) + rng.integers(0, 48, (r1 - r0, side), dtype=np.uint8)
            img[r0:r1, :, c] = np.clip(block, 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path, "PNG", compress_level=1)


def _flat_png(side: int) -> bytes:
    """A ``side`` x ``side`` PNG of few bytes: a flat colour with a faint 8 px pattern."""
    from PIL import Image

    tile = np.full((8, side, 3), (90, 120, 80), np.uint8)
    tile[:, ::16] = (100, 130, 90)
    img = np.ascontiguousarray(np.tile(tile, (side // 8 + 1, 1, 1))[:side])
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def _archive(root: Path, side: int, seed: int) -> tuple[Path, int]:
    """An ``lbp_rgb`` archive of 2 classes x 3 small images plus the big PNG; its path and the big image's id."""
    from PIL import Image

    from landlens.retrieval.archive import Archive, is_archive

    if is_archive(root / "archive"):  # made by an earlier run with the same --work
        arch = Archive.open(root / "archive")
        return root / "archive", next(r.id for r in arch.records() if r.name == "big.png")
    data = root / "data"
    rng = np.random.default_rng(seed)
    for cls in ("fields", "forest"):
        (data / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(data / cls / f"{i}.png")
    _big_png(data / "fields" / "big.png", side, seed)
    arch = Archive.build(data, root / "archive", backbone="lbp_rgb", progress=False)
    big = next(r.id for r in arch.records() if r.name == "big.png")
    return root / "archive", big


def _multipart(name: str, data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, bytes, float]:
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, data, (time.perf_counter() - t) * 1000.0
    finally:
        c.close()


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if _request(port, "GET", "/api/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become healthy")


def _burst(calls: list[Any]) -> list[tuple[int, bytes, float]]:
    """Run the zero-argument ``calls`` at once (one thread each, released together)."""
    out: list[Any] = [None] * len(calls)
    gate = threading.Barrier(len(calls))

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = calls[i]()
        except OSError as exc:
            out[i] = (-1, str(exc).encode(), float("nan"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _case(name: str, archive: Path, src: Path, big_id: int, upload: bytes, concurrency: int,
          log_dir: Path) -> dict[str, Any]:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(src)}
    env.pop("LANDLENS_TOKEN", None)
    cmd = [sys.executable, "-m", "landlens.cli.main", "serve", str(archive), "--port", str(port),
           "--optimize", "none", "--log-level", "warning"]
    with open(log_dir / f"{name}.server.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(port, proc)
            # warm-up: one small thumbnail and one small search (lazy imports, first allocations)
            _request(port, "GET", "/api/images/0/thumbnail?size=128")
            body, ctype = _multipart("small.png", _flat_png(64), {"k": "3"})
            _request(port, "POST", "/api/search", body, {"Content-Type": ctype})
            warm = _status_kib(proc.pid, "VmRSS")
            hwm_before = _status_kib(proc.pid, "VmHWM")
            t = time.perf_counter()
            if name == "thumbnails":
                sizes = [THUMBNAIL_SIZES[i % len(THUMBNAIL_SIZES)] for i in range(concurrency)]
                results = _burst([lambda s=s: _request(port, "GET", f"/api/images/{big_id}/thumbnail?size={s}")
                                  for s in sizes])
            else:
                def one() -> tuple[int, bytes, float]:
                    b, ct = _multipart("flat.png", upload, {"k": "3"})
                    return _request(port, "POST", "/api/search", b, {"Content-Type": ct})
                results = _burst([one for _ in range(concurrency)])
            wall = (time.perf_counter() - t) * 1000.0
            time.sleep(0.2)
            peak = _status_kib(proc.pid, "VmHWM")
            after = _status_kib(proc.pid, "VmRSS")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    errors = [r[1][:200].decode("utf-8", "replace") for r in results if r[0] != 200]
    ms = [r[2] for r in results]
    return {"case": name, "requests": concurrency, "statuses": statuses, "error_examples": errors[:3],
            "warm_rss_mib": warm / 1024, "peak_before_burst_mib": hwm_before / 1024, "peak_rss_mib": peak / 1024,
            "rss_after_mib": after / 1024, "growth_mib": (peak - warm) / 1024, "burst_wall_ms": wall,
            "latency_ms": {"min": float(np.nanmin(ms)), "median": float(np.nanmedian(ms)),
                           "max": float(np.nanmax(ms))}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=7000, help="side of the big images in pixels")
    ap.add_argument("--concurrency", type=int, default=8, help="requests per burst")
    ap.add_argument("--cases", nargs="+", default=["thumbnails", "uploads"], choices=["thumbnails", "uploads"])
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the landlens package the server runs")
    ap.add_argument("--label", default="", help="a name for this run in the report (e.g. before / after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated archive (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "service_memory")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(args.src.resolve()))
    work = args.work or Path(tempfile.mkdtemp(prefix="landlens-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    archive, big_id = _archive(work, args.side, args.seed)
    upload = _flat_png(args.side)
    print(f"archive in {time.perf_counter() - t0:.1f} s; big image id {big_id}; upload {len(upload) / 1024:.0f} KiB "
          f"of {args.side}x{args.side} px", flush=True)
    cases = []
    for name in args.cases:
        res = _case(name, archive, args.src.resolve(), big_id, upload, args.concurrency, work)
        cases.append(res)
        print(f"{name}: statuses {res['statuses']}, warm {res['warm_rss_mib']:.0f} MiB, peak {res['peak_rss_mib']:.0f} "
              f"MiB (+{res['growth_mib']:.0f}), latency median {res['latency_ms']['median']:.0f} ms, "
              f"max {res['latency_ms']['max']:.0f} ms", flush=True)
    doc = {
        "command": "python benchmarks/service_memory.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "label": args.label,
        "settings": {"side": args.side, "megapixels": args.side * args.side / 1e6, "concurrency": args.concurrency,
                     "upload_bytes": len(upload), "thumbnail_sizes": list(THUMBNAIL_SIZES), "seed": args.seed},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(doc))
    print(f"wrote {args.out.with_suffix('.md')}")


def _markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        f"# Service memory{': ' + doc['label'] if doc['label'] else ''}", "",
        f"Command: `{doc['command']}`", "",
        f"One burst of {s['concurrency']} concurrent requests per case, each case on a fresh server "
        f"(`landlens serve --optimize none`, `lbp_rgb` archive with one {s['side']}x{s['side']} PNG = "
        f"{s['megapixels']:.0f} Mpx). Uploads: a {s['side']}x{s['side']} PNG of {s['upload_bytes'] / 1024:.0f} KiB. "
        f"Peak = `VmHWM` of the server process; warm = `VmRSS` after one small thumbnail and one small search. "
        f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs.", "",
        "| case | statuses | warm RSS MiB | peak RSS MiB | growth MiB | latency median / max ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(c["statuses"].items()))
        lat = c["latency_ms"]
        lines.append(f"| {c['case']} | {st} | {c['warm_rss_mib']:.0f} | {c['peak_rss_mib']:.0f} | "
                     f"{c['growth_mib']:.0f} | {lat['median']:.0f} / {lat['max']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
