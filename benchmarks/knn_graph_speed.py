"""Time the database k-NN graph of the re-rankers: FAISS against the blocked torch top-k it replaced.

:func:`landlens.retrieval.rerank.graph.knn_graph` (``faiss.knn``, exact inner product) is
timed against the hand-written version landlens used before (blocks of ``x @ x.T`` rows,
the diagonal masked, ``torch.topk``; copied below as :func:`torch_knn_graph`), on
L2-normalised synthetic features from tiny to EuroSAT-sized databases, and the two
neighbour lists are compared (the share of identical indices; ties and float rounding may
swap neighbours of equal similarity).

    .venv/bin/python benchmarks/knn_graph_speed.py --threads 2 --out benchmarks/results/knn_graph_speed

Writes ``OUT.json`` and ``OUT.md`` (the table and the exact command).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from landlens import __version__
from landlens.atomic import atomic_write_bytes, atomic_write_json
from landlens.retrieval.rerank.graph import knn_graph

#: (images, dimensions): tiny test sets, a small archive, UC Merced with one backbone (Lite0,
#: 1280-d) and with six fused (4,992-d with PCA off), a 10,000-image archive, EuroSAT's 27,000.
SIZES = [(24, 3), (300, 64), (2100, 1280), (2100, 4992), (10000, 1280), (27000, 1280)]


def torch_knn_graph(x: torch.Tensor, k: int, block_elements: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """The version FAISS replaced (landlens.retrieval.rerank until this benchmark)."""
    n = x.shape[0]
    k = max(0, min(int(k), n - 1))
    sims = torch.empty((n, k), dtype=torch.float32)
    idx = torch.empty((n, k), dtype=torch.int64)
    if k == 0:
        return sims, idx
    rows = max(1, min(n, block_elements // max(1, n)))
    with torch.no_grad():
        for s in range(0, n, rows):
            e = min(n, s + rows)
            m = x[s:e] @ x.T
            m[torch.arange(e - s), torch.arange(s, e)] = -float("inf")
            v, i = torch.topk(m, k, dim=1)
            sims[s:e], idx[s:e] = v, i
    return sims, idx


def features(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Non-negative gamma features (like pooled post-ReLU CNN features), L2-normalised."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(1.0, 1.0, size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def best_of(fn, repeats: int, warm_up: bool) -> tuple[float, float, object]:
    """Fastest wall and CPU seconds of ``repeats`` calls (after a warm-up call), and the result."""
    if warm_up:
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=80, help="neighbours per row (k1 of the README's k-reciprocal)")
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS (OpenMP) threads")
    ap.add_argument("--max-n", type=int, default=27000, help="skip sizes above this many images")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/knn_graph_speed"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows = []
    for n, dim in SIZES:
        if n > args.max_n:
            continue
        a = features(n, dim)
        t = torch.from_numpy(a)
        small = n * n * dim <= 2100 * 2100 * 1280
        repeats = 5 if small else 2
        load = os.getloadavg()[0]
        tw, tc, (si, ii) = best_of(lambda t=t: torch_knn_graph(t, args.k), repeats, small)
        fw, fc, (sf, fi) = best_of(lambda t=t: knn_graph(t, args.k), repeats, small)
        row = {"n": n, "dim": dim, "k": min(args.k, n - 1), "torch_ms": 1000 * tw, "torch_cpu_ms": 1000 * tc,
               "faiss_ms": 1000 * fw, "faiss_cpu_ms": 1000 * fc, "load": load,
               "same_indices": float((ii.numpy() == fi.numpy()).mean()),
               "max_similarity_diff": float(np.abs(si.numpy() - sf.numpy()).max())}
        rows.append(row)
        print(f"{n:>6} x {dim:<5} torch {row['torch_ms']:9.2f} ms  faiss {row['faiss_ms']:9.2f} ms  "
              f"same {100 * row['same_indices']:.3f}%  load {load:.1f}", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "k": args.k, "threads": args.threads, "landlens": __version__,
            "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), meta)
    lines = [f"# k-NN graph of the re-ranking database: FAISS vs blocked torch top-k (k = {args.k})", "",
             (f"Exact inner-product neighbours of every row among the others, L2-normalised gamma features; "
             f"{args.threads} thread(s) for torch and FAISS, torch {torch.__version__}, faiss {faiss.__version__}. "
             "Best of several runs (5 after a warm-up up to 2,100 x 1,280, else 2); `load` is the 1-minute load average "
             "before the size: the machine was shared with other jobs, so wall times are upper bounds. "
             "`same` is the share of identical neighbour indices (ties may swap)."), "",
             ("`max sim diff`: the largest difference between the two lists' similarities at the same rank "
             "(so every swapped neighbour is a near-tie). `cpu ms`: process CPU time of the fastest run, summed "
             "over threads (a wall time far above it is time spent waiting for the CPU)."), "",
             ("| images | dim | torch ms | torch cpu ms | FAISS ms | FAISS cpu ms | torch / FAISS | same indices "
             "| max sim diff | load |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['dim']} | {r['torch_ms']:.2f} | {r['torch_cpu_ms']:.2f} | {r['faiss_ms']:.2f} | "
                     f"{r['faiss_cpu_ms']:.2f} | {r['torch_ms'] / r['faiss_ms']:.2f} | {100 * r['same_indices']:.3f}% | "
                     f"{r['max_similarity_diff']:.1e} | {r['load']:.1f} |")
    lines += ["", "Command:", "", "```bash", command, "```", ""]
    atomic_write_bytes(args.out.with_suffix(".md"), "\n".join(lines).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
