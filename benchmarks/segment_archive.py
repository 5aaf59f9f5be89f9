"""Updating a large archive: segment archives against the full rewrite of landlens before them.

For each archive size N, an archive of N vectors is made once (a real extractor's identity and
100 real UC Merced images indexed with it, then N synthetic vectors from a Gaussian mixture in
the extractor's dimension with synthetic catalog rows, indexed with ``auto``: IVF-Flat from
50,000 on). Then, each in a fresh process on its own hard-linked copy:

* ``segments``: this checkout. ``Archive.open``; ``add`` of a batch of real EuroSAT images
  (embedded by the archive's extractor); ``remove`` of a batch of ids; the plain search latency
  (k=10, 200 queries) after both; finally ``compact`` (which rewrites everything, for scale).
* ``rewrite``: the same steps with landlens as it was before segments (``--old`` commit, run
  from a ``git worktree``) on a format-1 copy of the same archive: every update writes a
  complete new generation (vectors, index and catalog), and ``remove`` retrains the index.

Measured per step: wall time (for ``add``, beside the time the same batch takes to decode and
embed alone), bytes of the files the step created (what is new in the archive folder), bytes
the process wrote (``/proc/self/io`` ``wchar``), and the process's peak RSS at the end (which
includes the compaction for ``segments``).

Usage:
    python benchmarks/segment_archive.py [--sizes 10000 100000 1000000] [--batch 100]
        [--old b0fd976] [--work /tmp/segment_bench] [--out benchmarks/results/segment_archive]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from measure import child_result, emit_result, peak_rss_mb  # noqa: E402
UCM = REPO / "../shared/data/UCMerced_LandUse/Images"
EUROSAT = REPO / "../shared/data/EuroSAT_RGB"
BACKBONE = "tv_squeezenet1_1"  # 512-d: a 1,000,000-vector archive is 2 GB of vectors + 2 GB of index



def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def _files(folder: Path) -> dict[tuple[str, int], int]:
    return {(str(p), p.stat().st_ino): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _step(arch_dir: Path, fn) -> dict:  # noqa: ANN001
    before_files, before_io = _files(arch_dir), _io()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    after_io = _io()
    new = {k: v for k, v in _files(arch_dir).items() if k not in before_files}
    return {"seconds": round(seconds, 3), "new_file_bytes": int(sum(new.values())), "new_files": len(new),
            "wchar": after_io["wchar"] - before_io["wchar"], "result": result}


def child(arch_dir: str, batch_file: str, remove_ids: str, do_compact: bool) -> None:
    """One run against the landlens on ``sys.path`` (this checkout or the old worktree)."""
    import landlens
    from landlens.retrieval.archive import Archive

    d = Path(arch_dir)
    batch = Path(batch_file).read_text().split("\n")
    ids = [int(i) for i in remove_ids.split(",")]
    out: dict = {"landlens": str(Path(landlens.__file__).parent)}
    t0 = time.perf_counter()
    arch = Archive.open(d)
    out["open_seconds"] = round(time.perf_counter() - t0, 3)
    out["images"] = len(arch)
    arch.backbone()  # the extractor is rebuilt once, outside the timed update
    t0 = time.perf_counter()
    arch.embed([arch.load_query(p) for p in batch])  # what an add spends embedding, measured alone
    out["embed_seconds"] = round(time.perf_counter() - t0, 3)
    out["add"] = _step(d, lambda: len(arch.add(batch, ["added"] * len(batch))))
    out["remove"] = _step(d, lambda: arch.remove(ids))
    rng = np.random.default_rng(0)
    qids = [r.id for r in rng.choice(np.array(arch.records(), dtype=object), 200, replace=False)]
    queries = np.stack([arch.vector(i) for i in qids])
    times = []
    for q in queries:
        t = time.perf_counter()
        arch.search_vectors(q[None], 10, rerank="none")
        times.append(time.perf_counter() - t)
    out["search_ms_p50"] = round(float(np.percentile(times, 50)) * 1e3, 3)
    out["search_ms_p99"] = round(float(np.percentile(times, 99)) * 1e3, 3)
    out["peak_rss_mb_before_compact"] = round(peak_rss_mb(), 1)
    if do_compact:
        out["compact"] = _step(d, lambda: arch.compact())
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    emit_result(out)


def make_archive(out: Path, n: int, template: Path, seed: int = 0) -> None:
    """An archive of the template's real images plus ``n`` synthetic vectors (format 2)."""
    from landlens.retrieval.archive import Archive
    from landlens.retrieval.generations import Generation, write_generation
    from landlens.retrieval.index import SearchIndex
    from landlens.retrieval.records import ImageRecord
    from landlens.retrieval.segments import segment_name, write_segment

    t = Archive.open(template)
    real = np.asarray(t._state.vectors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, real.shape[1])).astype(np.float32) * 2.0
    synth = np.empty((n, real.shape[1]), dtype=np.float32)
    for s in range(0, n, 65536):  # a Gaussian mixture, block by block
        m = min(65536, n - s)
        synth[s:s + m] = centres[rng.integers(0, 64, m)] + rng.normal(size=(m, real.shape[1])).astype(np.float32)
    synth = np.abs(synth)  # CNN features after ReLU are non-negative
    vectors = np.concatenate([real, synth])
    recs = list(t.records())
    added = recs[0].added
    recs += [ImageRecord(len(real) + i, f"/synthetic/{i:08d}.jpg", f"{i:08d}.jpg", f"c{i % 21}", 256, 256,
                         f"{i:064x}", 0, added) for i in range(n)]
    index = SearchIndex("auto", meta=t.index.meta).fit(vectors)
    out.mkdir(parents=True)
    seg = write_segment(out, segment_name(1), index, vectors, recs, {})
    meta = {**t.meta, "index_settings": index.get_params()}
    write_generation(out, Generation(1, [seg], frozenset(), len(recs), meta), None)


def to_format_1(src: Path, dst: Path) -> None:
    """A hard-linked copy of a one-segment archive in the layout of landlens before segments."""
    doc = json.loads((src / "gen-00000001" / "generation.json").read_text())
    gen = dst / "gen-00000001"
    shutil.copytree(src / "segments" / "seg-00000001", gen, copy_function=os.link)
    (gen / "segment.json").unlink()
    old = {k: doc[k] for k in ("generation", "parent", "images", "next_id", "written", "meta")}
    (gen / "generation.json").write_text(json.dumps({**old, "format": 1}))
    (dst / "CURRENT").write_text("gen-00000001\n")


def run(arch_dir: Path, src: Path, batch_file: Path, ids: list[int], compact: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--child", str(arch_dir), str(batch_file), ",".join(map(str, ids)),
           "1" if compact else "0"]
    return child_result(cmd, env=env, cwd=REPO)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--old", default="b0fd976", help="the commit before segment archives")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/segment_archive")
    ap.add_argument("--child", nargs=4, default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], args.child[3] == "1")
        return
    from landlens.retrieval.archive import Archive

    work = Path(args.work or tempfile.mkdtemp(prefix="segment_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    old_tree = work / "old"
    if not old_tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=REPO, check=True)
    rng = np.random.default_rng(0)
    seed_dir = work / "seed"  # 100 UC Merced images: 5 of each of 20 classes, linked
    if not seed_dir.exists():
        for c in sorted(p for p in UCM.iterdir() if p.is_dir())[:20]:
            (seed_dir / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:5]:
                (seed_dir / c.name / f.name).symlink_to(f.resolve())
    template = work / "template"
    if not template.exists():
        Archive.build(seed_dir, template, backbone=BACKBONE, rerank=None, cache_dir=work / "features", progress=False)
    eurosat = sorted(EUROSAT.rglob("*.jpg"))
    batch = [str(eurosat[i]) for i in rng.choice(len(eurosat), args.batch, replace=False)]
    batch_file = work / "batch.txt"
    batch_file.write_text("\n".join(batch))
    rows = []
    for n in args.sizes:
        base = work / f"n{n}"
        if not (base / "CURRENT").exists():
            shutil.rmtree(base, ignore_errors=True)
            t0 = time.perf_counter()
            make_archive(base, n, template)
            print(f"made {n}: {time.perf_counter() - t0:.0f} s", flush=True)
        ids = [int(i) for i in 100 + rng.choice(n, args.batch, replace=False)]  # synthetic rows
        for name, src in (("segments", REPO / "src"), ("rewrite", old_tree / "src")):
            copy = work / f"n{n}-{name}"
            shutil.rmtree(copy, ignore_errors=True)
            if name == "segments":
                shutil.copytree(base, copy, copy_function=os.link)
            else:
                to_format_1(base, copy)
            r = run(copy, src, batch_file, ids, compact=name == "segments")
            r.update(size=n, method=name)
            rows.append(r)
            print(json.dumps(r), flush=True)
            shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO, check=False)
    write_results(args, rows)


def write_results(args: argparse.Namespace, rows: list[dict]) -> None:
    import torch

    cmd = "python benchmarks/segment_archive.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
        (("sizes", args.sizes), ("batch", args.batch), ("old", args.old)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows, "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}, indent=1) + "\n")
    mb = 1e6
    lines = ["# Updating a large archive: segments against the full rewrite\n",
             f"Command: `{cmd}`  ",
             f"Machine: {os.cpu_count()} cores; backbone {BACKBONE} (512-d); archives of N synthetic vectors "
             f"(Gaussian mixture) + 100 real UC Merced images, index `auto` (IVF-Flat from 50,000); "
             f"batch: {args.batch} EuroSAT images added, {args.batch} ids removed. `rewrite` is landlens at "
             f"{args.old} (before segments) on the same archive in its format.\n",
             "| N | method | open s | add s (embedding alone) | add: new bytes on disk | add: bytes written | "
             "remove s | remove: new bytes | remove: bytes written | search p50 / p99 ms | peak RSS MB (before compaction) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, d = r["add"], r["remove"]
        lines.append(f"| {r['size']:,} | {r['method']} | {r['open_seconds']:.1f} | {a['seconds']:.2f} "
                     f"({r['embed_seconds']:.2f}) | "
                     f"{a['new_file_bytes'] / mb:,.2f} MB | {a['wchar'] / mb:,.2f} MB | {d['seconds']:.2f} | "
                     f"{d['new_file_bytes'] / mb:,.3f} MB | {d['wchar'] / mb:,.3f} MB | "
                     f"{r['search_ms_p50']:.2f} / {r['search_ms_p99']:.2f} | {r['peak_rss_mb_before_compact']:,.0f} |")
    lines += ["", "Compaction (segments only; rewrites the whole archive into one segment, IVF retrained):", "",
              "| N | compact s | new bytes on disk | peak RSS MB |", "|---:|---:|---:|---:|"]
    for r in rows:
        if "compact" in r:
            c = r["compact"]
            lines.append(f"| {r['size']:,} | {c['seconds']:.1f} | {c['new_file_bytes'] / mb:,.1f} MB | "
                         f"{r['peak_rss_mb']:,.0f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
