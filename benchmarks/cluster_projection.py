"""Cluster projections before k-reciprocal re-ranking (issue #16): ``clusterlda+kreciprocal``
against ``kreciprocal`` alone, no label used by either.

Part A chooses ``clusterlda``'s settings (the grid of cluster counts and the weight of the
projected block) on UC Merced's *val* queries (the 210 of 70/10/20, seed 0, querying the whole
archive), per backbone. Part B checks the setting chosen on the default ``fusion`` on EuroSAT's
val queries (the val part of 70/20/10, seed 0), a scene set with 10 classes and 13x the images,
so that the choice is not UC Merced's alone. The archive mAP over every query is reported beside
each val figure once, as the protocol asks; nothing is chosen on it.

Usage:
    python benchmarks/cluster_projection.py [--ucm ../shared/data/UCMerced_LandUse]
        [--eurosat ../shared/data/EuroSAT_RGB] [--backbones tf_efficientnet_lite0 fusion c4:fusion]
        [--skip-eurosat] [--out benchmarks/results/cluster_projection]

Features come from the shared cache ``runs/features`` (extracted there when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
KR = "kreciprocal:k1=80,k2=6,lambda=0.1"  # the archive default (benchmarks/results/default_pipeline.md)
#: (kmin, kmax, steps): cluster counts spaced by about sqrt(2), from a few to many groups
GRIDS = [(8, 64, 7), (12, 96, 7), (16, 64, 5), (24, 96, 5)]
WEIGHTS = (1.0, 2.0)


def candidates() -> list[str]:
    return [f"clusterlda:kmin={a},kmax={b},steps={s},weight={w:g}+{KR}" for a, b, s in GRIDS for w in WEIGHTS]


def _score(fs, val: np.ndarray, rerank: str | None) -> dict:
    from landlens.retrieval.evaluate import evaluate
    from landlens.retrieval.metrics import NoRelevantWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoRelevantWarning)
        res = evaluate(fs, protocol="archive", rerank=rerank)
    m = res.metrics
    return {"rerank": rerank, "val_map": round(100 * float(np.nanmean(res.scores.ap[val])), 2),
            "map": round(100 * m["mAP"], 2), "anmrr": round(m["ANMRR"], 4), "p@10": round(100 * m["P@10"], 2),
            "fit_s": (res.rerank or {}).get("fit_seconds"), "wall_s": round(time.perf_counter() - t0, 1)}


def _data(root: Path, name: str, ratios: str, backbone: str):
    from landlens.data.folder import scan_folder
    from landlens.data.splits import make_split
    from landlens.features.cache import cached_features

    ds = scan_folder(root, name)
    manifest = make_split(ds.paths, ds.labels, ds.classes, ratios=ratios, seed=0, dataset=name)
    fs = cached_features(root, name, backbone, "package", cache_dir=REPO / "runs" / "features", progress=True,
                         command="benchmarks/cluster_projection.py")
    val = np.zeros(len(fs.paths), bool)
    val[manifest.indices("val", fs.paths)] = True
    return fs, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ucm", type=Path, default=SHARED / "UCMerced_LandUse")
    ap.add_argument("--eurosat", type=Path, default=SHARED / "EuroSAT_RGB")
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "fusion", "c4:fusion"])
    ap.add_argument("--skip-eurosat", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cluster_projection")
    args = ap.parse_args()
    import torch

    ucm: list[dict] = []
    chosen: dict[str, str] = {}
    for backbone in args.backbones:
        fs, val = _data(args.ucm, "ucmerced", "70/10/20", backbone)
        rows = [_score(fs, val, None), _score(fs, val, KR)]
        rows += [_score(fs, val, spec) for spec in candidates()]
        for r in rows:
            print(json.dumps({"backbone": backbone, **r}), flush=True)
        best = max(rows[2:], key=lambda r: r["val_map"])
        chosen[backbone] = best["rerank"]
        ucm.append({"backbone": backbone, "rows": rows, "chosen": best["rerank"]})
    eurosat = None
    pick = chosen.get("fusion") or next(iter(chosen.values()))
    if not args.skip_eurosat:
        fs, val = _data(args.eurosat, "eurosat", "70/20/10", "fusion")
        rows = [_score(fs, val, KR), _score(fs, val, pick)]
        for r in rows:
            print(json.dumps({"dataset": "eurosat", **r}), flush=True)
        eurosat = {"backbone": "fusion", "rows": rows}
    doc = {"command": "python benchmarks/cluster_projection.py " + " ".join(sys.argv[1:]), "kreciprocal": KR,
           "candidates": candidates(), "ucmerced": ucm, "eurosat": eurosat, "chosen_on_fusion": pick,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def _cell(r: dict) -> str:
    return f"{r['val_map']:.2f} | {r['map']:.2f} | {r['anmrr']:.4f} | {r['p@10']:.2f} | {r['fit_s'] or 0:.1f}"


def markdown(doc: dict) -> str:
    lines = [
        "# Cluster projections before k-reciprocal re-ranking (no labels)\n",
        f"`{doc['command'].strip()}`\n",
        f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} cores, torch {doc['machine']['torch']}; "
        "offline weights (`package`). `archive` protocol: every image queries the rest, cosine on L2-normalised "
        "features, no label. **val mAP**: the val queries (UC Merced 70/10/20 seed 0: 210; EuroSAT 70/20/10 seed 0: "
        "5,400) against the whole archive, what every choice is made on; **mAP**: every query. `fit s`: learning the "
        "re-ranking on the archive (clustering + LDA + the k-NN graph), paid once per archive; timings from a "
        "machine shared with other jobs.\n",
        "## A. UC Merced: the settings, chosen on val per backbone\n",
        "| backbone | re-ranking | val mAP | mAP | ANMRR | P@10 | fit s |", "|---|---|---:|---:|---:|---:|---:|"]
    for b in doc["ucmerced"]:
        for r in b["rows"]:
            mark = " **(chosen)**" if r["rerank"] == b["chosen"] else ""
            lines.append(f"| {b['backbone']} | `{r['rerank'] or 'none'}`{mark} | {_cell(r)} |")
    if doc["eurosat"]:
        lines += ["", "## B. EuroSAT (27,000 images), the setting chosen on UC Merced's fusion\n",
                  "| backbone | re-ranking | val mAP | mAP | ANMRR | P@10 | fit s |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in doc["eurosat"]["rows"]:
            lines.append(f"| fusion | `{r['rerank']}` | {_cell(r)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
