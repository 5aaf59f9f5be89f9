"""Feature extraction on Ray Data against the local engine, on EuroSAT RGB.

Each configuration runs in a fresh process into a fresh feature store (never the shared cache):

* ``local``: the default engine (decoding processes + one traced model in the main process);
* ``ray-1`` / ``ray-2``: Ray started on this machine (all its CPUs), 1 or 2 backbone actors;
* ``cluster-2``: a simulated two-node cluster on this machine (``ray.cluster_utils.Cluster``,
  two nodes of one CPU each: both share the same cores, so this measures Ray's overhead across
  nodes, not more hardware), 2 actors.

Reported: images/s over the whole call (Ray's start-up included) and after the first features
arrived, the largest absolute difference of each store's features from the local store's, and
the scaling efficiency (2-actor throughput / (2 x 1-actor throughput)).

Usage:
    python benchmarks/ray_extract.py [--images 27000] [--backbone tf_efficientnet_lite0]
        [--out benchmarks/results/ray_extract]
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
EUROSAT = REPO / "../shared/data/EuroSAT_RGB"
CONFIGS = ["local", "ray-1", "ray-2", "cluster-2"]


def child(config: str, store: str, images: int, backbone: str) -> None:
    """One configuration, in this (fresh) process; prints a JSON line."""
    from landlens.data.folder import scan_folder
    from landlens.features.extract import extract_features
    from landlens.models.registry import create_backbone

    ds = scan_folder(EUROSAT)
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(ds.paths), min(images, len(ds.paths)), replace=False))
    paths = [ds.paths[i] for i in keep]
    labels = [int(ds.labels[i]) for i in keep]
    bb = create_backbone(backbone, "package")
    kw: dict = {"progress": False, "batch_size": 64}
    cluster = None
    if config == "local":
        kw["workers"] = 2
    else:
        from landlens.features.ray_engine import connect

        if config.startswith("cluster"):
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            cluster.add_node(num_cpus=1)
            connect(cluster.address)
        else:
            connect(None)
        kw.update(engine="ray", actors=int(config.split("-")[1]))
    t0 = time.perf_counter()
    res = extract_features(ds.root, paths, labels, ds.classes, bb, store, **kw)
    seconds = time.perf_counter() - t0
    run = res.meta.get("last_run", {})
    print(json.dumps({"config": config, "images": len(paths), "seconds": round(seconds, 2),
                      "startup_seconds": run.get("prepare_seconds"),
                      "images_per_second": round(len(paths) / seconds, 2),
                      "steady_images_per_second": run.get("images_per_second")}))
    if cluster is not None:
        import ray

        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=27000)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/ray_extract")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.images, args.backbone)
        return
    from landlens.features.store import FeatureStore

    work = Path(tempfile.mkdtemp(prefix="ray_extract_", dir=REPO / "runs"))
    rows, feats = [], {}
    try:
        for config in args.configs:
            store = work / config
            cmd = [sys.executable, __file__, "--images", str(args.images), "--backbone", args.backbone,
                   "--child", config, str(store)]
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if p.returncode != 0:
                raise SystemExit(f"{config} failed:\n{p.stderr[-4000:]}")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            fs = FeatureStore(store).load()
            feats[config] = fs.features
            if "local" in feats and config != "local":
                row["max_abs_diff_vs_local"] = float(np.nanmax(np.abs(fs.features - feats["local"])))
            rows.append(row)
            print(f"  {row}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["config"]: r for r in rows}
    eff = None
    if "ray-1" in by and "ray-2" in by:
        eff = by["ray-2"]["images_per_second"] / (2 * by["ray-1"]["images_per_second"])
    doc = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "command": "python benchmarks/ray_extract.py " + " ".join(sys.argv[1:]), "backbone": args.backbone,
           "rows": rows, "scaling_efficiency_1_to_2_actors": eff}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    lines = ["# Feature extraction: local engine and Ray Data", "",
             f"Machine: {doc['machine']}; EuroSAT RGB, {rows[0]['images']} images, {args.backbone} (packaged weights), "
             f"batch 64. Command: `{doc['command']}`.", "",
             "| configuration | seconds | images/s (whole call) | images/s (after start-up) | start-up s | "
             "max abs diff vs local |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        diff = r.get("max_abs_diff_vs_local")
        lines.append(f"| {r['config']} | {r['seconds']} | {r['images_per_second']} | {r['steady_images_per_second']} | "
                     f"{r['startup_seconds']} | {'' if diff is None else f'{diff:.2g}'} |")
    if eff is not None:
        lines += ["", f"Scaling efficiency from 1 to 2 actors: {eff:.2f} (on 2 cores, where the decode tasks and "
                      "the actors share the same two cores)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
