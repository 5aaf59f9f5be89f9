"""Time whole-archive retrieval evaluation (every image queries all the others).

Synthetic features shaped like EuroSAT with a 1280-d backbone (27,000 x 1280, 10 classes of
2,700) by default; ``--features STORE`` times a real feature store instead. Reports the
wall time of :func:`landlens.retrieval.metrics.evaluate_retrieval` per distance and setting,
and checks that the fast settings give the same numbers as the reference ones.

    .venv/bin/python benchmarks/eval_speed.py --threads 2 --out benchmarks/results/eval_speed

Writes ``OUT.json`` and ``OUT.md`` (the table and the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from landlens import __version__
from landlens.atomic import atomic_write_bytes, atomic_write_json
from landlens.retrieval.metrics import evaluate_retrieval


def synthetic(n: int, dim: int, n_classes: int, seed: int = 0, separation: float = 0.25
              ) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative class-clustered features (like pooled post-ReLU CNN features), class-sorted.

    ``separation`` scales the class centres against unit gamma noise; 0.25 gives a cosine mAP
    near 0.6 (the range of ImageNet features on UC Merced), so rankings are far from trivial.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), -(-n // n_classes))[:n]
    centres = separation * rng.gamma(1.0, 1.0, size=(n_classes, dim)).astype(np.float32)
    x = centres[labels] + rng.gamma(1.0, 1.0, size=(n, dim)).astype(np.float32)
    return x, labels


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=27000, help="synthetic images")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--features", type=Path, default=None, help="time a feature store instead of synthetic data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distances", default="cosine,euclidean")
    ap.add_argument("--blocks", default="auto", help="comma-separated query block sizes to compare ('auto' = default)")
    ap.add_argument("--slow-distances", default="",
                    help="distances without a matrix-product form (e.g. manhattan,chi2), timed on --slow-n images")
    ap.add_argument("--slow-n", type=int, default=2100, help="synthetic images for --slow-distances (UC Merced size)")
    ap.add_argument("--reference", action="store_true",
                    help="also time the reference settings (no symmetric reuse, torch stable sort) on cosine")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.features is not None:
        from landlens.features.store import FeatureStore

        fs = FeatureStore(args.features).load().only_valid()
        x, labels, source = np.asarray(fs.features, np.float32), fs.labels, f"feature store {args.features}"
    else:
        x, labels = synthetic(args.n, args.dim, args.classes)
        source = f"synthetic {args.n} x {args.dim}, {args.classes} classes"
    print(f"{source}; {args.threads} thread(s); {cpu_name()}", flush=True)

    runs = []
    settings: list[tuple[str, dict, bool]] = []
    for dist in args.distances.split(","):
        for blk in args.blocks.split(","):
            block = None if blk == "auto" else int(blk)
            settings.append((dist, {"block": block}, False))
    if args.reference:
        settings.append(("cosine", {"block": None, "symmetric_cache_bytes": 0}, False))
        settings.append(("cosine", {"block": None, "symmetric_cache_bytes": 0, "method": "stable-sort"}, False))
    for dist in filter(None, args.slow_distances.split(",")):
        settings.append((dist, {"block": None}, True))
    small = synthetic(args.slow_n, args.dim, args.classes) if args.slow_distances else None
    base: dict[tuple[str, int], dict[str, float]] = {}
    for dist, kw, slow in settings:
        xs, ls = small if slow and small is not None else (x, labels)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        t0, c0 = time.perf_counter(), time.process_time()
        s = evaluate_retrieval(xs, ls, metric=dist, **kw)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        summ = s.summary()
        row = {"distance": dist, "images": int(len(ls)), "block": kw.get("block") or "auto",
               "symmetric_reuse": kw.get("symmetric_cache_bytes", 1) != 0,
               "ranking": kw.get("method", "packed"), "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
               "load_before": round(load, 2), "mAP": summ["mAP"], "ANMRR": summ["ANMRR"],
               "P@10": summ["P@10"], "P@1000": summ["P@1000"]}
        if (dist, len(ls)) in base:
            row["max_abs_diff_vs_first"] = max(abs(summ[k] - base[(dist, len(ls))][k]) for k in summ)
        else:
            base[(dist, len(ls))] = summ
        runs.append(row)
        print(json.dumps(row), flush=True)

    if args.out is not None:
        command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        meta = {"command": command, "source": source, "n_images": int(len(labels)), "dim": int(x.shape[1]),
                "threads": args.threads, "cpu": cpu_name(), "landlens": __version__, "torch": torch.__version__,
                "numpy": np.__version__, "python": platform.python_version(), "runs": runs}
        atomic_write_json(args.out.with_suffix(".json"), meta)
        lines = [
            f"# Whole-archive evaluation speed ({source})",
            "",
            "`archive` protocol: every image queries all the others; each run computes mAP, ANMRR,",
            "P@5/10/50/100/1000, class-wise mAP and the top-10 confusion matrix. "
            f"{args.threads} torch thread(s), {cpu_name()},",
            f"torch {torch.__version__}, numpy {np.__version__}. `load` is the 1-minute load average just before",
            "the run: the machine was shared with other jobs, so wall times are upper bounds; `cpu s` is the",
            "process CPU time summed over its threads (less sensitive to the other jobs).",
            "`symmetric reuse`: each distance block computed once, its transpose reused (half the matrix",
            "products); `ranking`: `packed` int64 keys sorted by numpy vs `stable-sort` (torch.sort, stable).",
            "",
            "| images | distance | block | symmetric reuse | ranking | wall s | cpu s | load | mAP | ANMRR | P@10 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            lines.append(f"| {r['images']} | {r['distance']} | {r['block']} | {'yes' if r['symmetric_reuse'] else 'no'} | "
                         f"{r['ranking']} | "
                         f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['load_before']:.1f} | {100 * r['mAP']:.2f} | {r['ANMRR']:.4f} | "
                         f"{100 * r['P@10']:.2f} |")
        lines += ["", "Command:", "", "```bash", command, "```", ""]
        atomic_write_bytes(args.out.with_suffix(".md"), "\n".join(lines).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
