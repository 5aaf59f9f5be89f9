"""The on-disk IVF-PQ index (:mod:`landlens.retrieval.ondisk`) at tens of millions of vectors.

The database is a stream of synthetic vectors from a Gaussian mixture (1,024 components in ``dim``
dimensions, each spread along a shared random 16-d subspace plus isotropic noise of 0.05: data of
low intrinsic dimension, as CNN features are; an isotropic mixture in 128-d has no meaningful
nearest neighbours). Every 256-row chunk is generated from its own seed, so any rows can be
produced again and the stream is never held in memory or written out. Steps:

1. build: train on a seeded sample, encode shards (worker processes), merge into one on-disk
   list file; time of each phase and peak RSS of the build process;
2. ground truth: the exact top-10 (cosine) of 200 queries (new draws from the mixture) by a
   blockwise brute force over the regenerated stream;
3. search, in a fresh process: recall@10 against the ground truth for several ``nprobe``, from the
   PQ codes alone and after the exact re-ranking of ``refine_factor * 10`` candidates (vectors
   regenerated for the candidates: the re-ranked latency here includes that generation, so only
   the PQ latency is a search cost); p50 / p99 single-query latency; peak RSS; bytes on disk.

Usage:
    python benchmarks/ondisk_index.py [--n 20000000] [--dim 128] [--nlist 8192] [--pq-m 16]
        [--shard 1000000] [--workers 2] [--work /tmp/ondisk_bench] [--out benchmarks/results/ondisk_index]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import child_result, emit_result, peak_rss_mb, resident_mb  # noqa: E402
CHUNK = 256
LATENT = 16  # each component spreads along a 16-d subspace, as CNN features have a low intrinsic dimension
NOISE = 0.05  # isotropic noise around it
NPROBES = (32, 64, 128, 256)



class MixtureRows:
    """Rows of an endless Gaussian mixture, chunk by chunk from per-chunk seeds (picklable)."""

    def __init__(self, n: int, dim: int, seed: int = 0, centres: int = 1024, latent: int = LATENT) -> None:
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng([seed, 2**31])
        self.centres = rng.normal(size=(centres, dim)).astype(np.float32)
        self.basis = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
        self.shape = (n, dim)

    def chunk(self, c: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, c])
        which = rng.integers(0, len(self.centres), CHUNK)
        z = rng.normal(size=(CHUNK, len(self.basis))).astype(np.float32)
        noise = rng.normal(size=(CHUNK, self.dim)).astype(np.float32)
        return self.centres[which] + z @ self.basis + NOISE * noise

    def __call__(self, start: int, stop: int) -> np.ndarray:
        c0, c1 = start // CHUNK, (stop - 1) // CHUNK + 1
        x = np.concatenate([self.chunk(c) for c in range(c0, c1)])
        return x[start - c0 * CHUNK: stop - c0 * CHUNK]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for c in np.unique(rows // CHUNK):
            at = np.flatnonzero(rows // CHUNK == c)
            out[at] = self.chunk(int(c))[rows[at] - c * CHUNK]
        return out


def queries(dim: int, seed: int, n: int = 200) -> np.ndarray:
    # chunks far past the database: the same mixture, never database rows
    return MixtureRows(1 << 40, dim, seed)(1 << 39, (1 << 39) + n)


def ground_truth(src: MixtureRows, q: np.ndarray, k: int = 10, block: int = 1 << 20) -> np.ndarray:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), k), dtype=np.int64)
    for a in range(0, src.n, block):
        x = src(a, min(src.n, a + block))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        s = qn @ x.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + a], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def search_child(folder: str, n: int, dim: int, seed: int, gt_file: str) -> None:
    from landlens.retrieval.ondisk import DiskIndex

    src = MixtureRows(n, dim, seed)
    q = queries(dim, seed)
    gt = np.load(gt_file)
    before = peak_rss_mb()
    t0 = time.perf_counter()
    idx = DiskIndex.open(folder, src)
    out: dict = {"open_seconds": round(time.perf_counter() - t0, 3), "disk_bytes": idx.disk_bytes(), "rows": []}
    for nprobe in NPROBES:
        idx.nprobe = nprobe
        for refine in (0, 10, 30):  # PQ codes only; exact re-ranking of 100 / 300 candidates
            idx.refine_factor = max(refine, 1)
            times, hits = [], []
            for qi in range(len(q)):
                t = time.perf_counter()
                _, ids = idx.search(q[qi:qi + 1], 10, rerank=refine > 0)
                times.append(time.perf_counter() - t)
                hits.append(len(set(ids[0].tolist()) & set(gt[qi].tolist())) / 10)
            out["rows"].append({"nprobe": nprobe, "candidates": 10 * refine, "recall@10": round(float(np.mean(hits)), 4),
                                "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
                                "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3)})
            print(json.dumps(out["rows"][-1]), file=sys.stderr, flush=True)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["resident_at_end_mb"] = {k: round(v, 1) for k, v in resident_mb().items()}
    out["rss_before_open_mb"] = round(before, 1)
    emit_result(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nlist", type=int, default=8192)
    ap.add_argument("--pq-m", type=int, default=16)
    ap.add_argument("--shard", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ondisk_bench"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ondisk_index")
    ap.add_argument("--child", nargs=2, default=None)
    args = ap.parse_args()
    if args.child:
        search_child(args.child[0], args.n, args.dim, args.seed, args.child[1])
        return
    from landlens.retrieval.ondisk import DiskIndex, DiskIndexSettings, build_disk_index

    folder = args.work / f"n{args.n}_d{args.dim}"
    src = MixtureRows(args.n, args.dim, args.seed)
    settings = DiskIndexSettings(nlist=args.nlist, pq_m=args.pq_m, shard_size=args.shard)
    build_file = args.work / f"build_n{args.n}_d{args.dim}.json"
    if build_file.exists() and (folder / "index.faiss").exists():  # built by an earlier run: search it again
        build = json.loads(build_file.read_text())
        build["reused"] = True
        idx = DiskIndex.open(folder)
    else:
        t0 = time.perf_counter()
        idx = build_disk_index(src, args.n, args.dim, folder, settings, workers=args.workers, progress=True)
        build = {"seconds": round(time.perf_counter() - t0, 1),
                 "peak_rss_mb_build_process": round(peak_rss_mb(), 1),
                 **{k: v for k, v in idx.meta.items() if k.endswith("_seconds") or k.endswith("_bytes")}}
        build_file.write_text(json.dumps(build))
    print(json.dumps(build), flush=True)
    gt_file = args.work / f"gt_n{args.n}_d{args.dim}.npy"
    gt_seconds = None  # None: computed by an earlier run
    if not gt_file.exists():
        t0 = time.perf_counter()
        np.save(gt_file, ground_truth(src, queries(args.dim, args.seed)))
        gt_seconds = round(time.perf_counter() - t0, 1)
    search = child_result([sys.executable, __file__, "--n", str(args.n), "--dim", str(args.dim), "--seed",
                           str(args.seed), "--child", str(folder), str(gt_file)])
    cmd = (f"python benchmarks/ondisk_index.py --n {args.n} --dim {args.dim} --nlist {args.nlist} --pq-m {args.pq_m} "
           f"--shard {args.shard} --workers {args.workers}")
    doc = {"command": cmd, "n": args.n, "dim": args.dim, "factory": idx.meta["factory"], "build": build,
           "ground_truth_seconds": gt_seconds, "search": search, "cpus": os.cpu_count()}
    out = args.out.parent / f"{args.out.name}_n{args.n}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    raw = args.n * args.dim * 4
    lines = [f"# On-disk IVF-PQ index: {args.n:,} vectors of {args.dim} dimensions\n",
             f"Command: `{cmd}`  ",
             f"Machine: {os.cpu_count()} cores. Index `{idx.meta['factory']}` with on-disk inverted lists; "
             f"vectors: a Gaussian mixture streamed by chunk seeds (never stored).\n",
             "| build | seconds |", "|---|---:|",
             f"| train (OPQ, coarse k-means, PQ) on {idx.meta['settings']['train_size']:,} sampled vectors | "
             f"{build.get('train_seconds', float('nan')):.1f} |",
             f"| encode {args.n // args.shard} shards of {args.shard:,} ({args.workers} worker processes, "
             f"generation of the vectors included) | {build.get('encode_seconds', float('nan')):.1f} |",
             f"| merge into one list file | {build.get('merge_seconds', float('nan')):.1f} |",
             f"| whole build | {build['seconds']:.1f} |", "",
             *(["The build is that of an earlier run of this command (same settings and data), searched again "
                "here.\n"] if build.get("reused") else []),
             f"On disk: {search['disk_bytes'] / 1e9:.2f} GB (the raw float32 vectors would be {raw / 1e9:.1f} GB). "
             f"Peak RSS: build process {build['peak_rss_mb_build_process']:,.0f} MB; "
             f"search process {search['peak_rss_mb']:,.0f} MB, of which {search['rss_before_open_mb']:,.0f} MB before "
             f"the index was opened (Python, NumPy, FAISS, landlens); resident after every search below: "
             f"{search['resident_at_end_mb'].get('anon', float('nan')):,.0f} MB of its own and "
             f"{search['resident_at_end_mb'].get('file', float('nan')):,.0f} MB of mapped file pages (the lists the "
             f"queries visited, which the kernel drops under pressure). Ground truth (exact brute force over the "
             f"regenerated stream, 200 queries): "
             + (f"{gt_seconds:.0f} s.\n" if gt_seconds is not None else "computed by an earlier run.\n"),
             "| nprobe | re-rank | recall@10 | p50 ms | p99 ms |", "|---:|---|---:|---:|---:|"]
    for r in search["rows"]:
        how = f"exact, {r['candidates']} candidates" if r["candidates"] else "PQ codes only"
        lines.append(f"| {r['nprobe']} | {how} | {r['recall@10']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines.append("\nThe re-ranked latencies include regenerating the candidates' vectors from their chunk seeds "
                 "(256 rows per candidate chunk), which reading them from a vectors file would replace.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
