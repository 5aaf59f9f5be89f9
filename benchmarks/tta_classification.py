"""Test-time group means for scene classification (issue #16), chosen the honest way: 5-fold
cross-validated accuracy on the *train* part of UC Merced 80/20 (stratified, seed 0) only; the test
part is not touched. Logistic regression on standardised features (``train baseline``'s method;
C = 0.1 and 1), plain backbones against their ``c4:`` rotation means (:mod:`landlens.models.tta`).

Usage:
    python benchmarks/tta_classification.py [--data ../shared/data/UCMerced_LandUse]
        [--features tf_efficientnet_lite0 c4:tf_efficientnet_lite0 fusion c4:fusion]
        [--cache-dir runs/features] [--out benchmarks/results/tta_classification]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "../shared/data/UCMerced_LandUse")
    ap.add_argument("--features", nargs="+",
                    default=["tf_efficientnet_lite0", "c4:tf_efficientnet_lite0", "fusion", "c4:fusion"])
    ap.add_argument("--cache-dir", type=Path, default=REPO / "runs/features")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tta_classification")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from landlens.data.folder import scan_folder
    from landlens.data.splits import make_split
    from landlens.features.cache import cached_features

    ds = scan_folder(args.data, "ucmerced")
    manifest = make_split(ds.paths, ds.labels, ds.classes, ratios="80/20", seed=0, dataset="ucmerced")
    rows = []
    for name in args.features:
        fs = cached_features(args.data, "ucmerced", name, "package", cache_dir=args.cache_dir, progress=False,
                             command="benchmarks/tta_classification.py")
        train = manifest.indices("train", fs.paths)
        x, y = np.asarray(fs.features, np.float32)[train], np.asarray(fs.labels)[train]
        for c in (0.1, 1.0):
            t0 = time.perf_counter()
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
            folds = cross_val_score(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
            rows.append({"features": name, "C": c, "cv_accuracy": round(100 * float(folds.mean()), 2),
                         "folds": [round(100 * float(v), 1) for v in folds],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    cmd = "python benchmarks/tta_classification.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": cmd.strip(), "rows": rows,
                                                         "cpus": os.cpu_count()}, indent=1) + "\n")
    lines = ["# Test-time rotations for classification: train-part cross-validation (UC Merced 80/20)\n",
             f"`{cmd.strip()}`\n",
             f"{len(train)} train images of the 80/20 split (seed 0), 5 stratified folds (seed 0); logistic "
             "regression on standardised features. The test part is not used: this chooses, it does not report.\n",
             "| features | C | CV accuracy % | folds % |", "|---|---:|---:|---|"]
    lines += [f"| {r['features']} | {r['C']:g} | {r['cv_accuracy']:.2f} | {', '.join(map(str, r['folds']))} |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
