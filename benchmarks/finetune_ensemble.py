"""A fine-tuned network and frozen fused features, alone and averaged (issue #16, UC Merced 80/20).

Members, all trained on the *train* part of the run's split (UC Merced 70/10/20, seed 0; its test
part is the test part of 80/20 seed 0, so the test figures answer the 80/20 goal):

- ``finetuned``: the run's fine-tuned classifier (``benchmarks/configs/ucm_finetune.yaml``, epoch
  chosen on the val part), one forward pass;
- ``finetuned c4``: the same network with its pooled features averaged over the four 90-degree
  rotations (``c4:run:RUN``); the head is linear, so this is the mean of the four logits;
- ``logreg c4:fusion``: logistic regression on the frozen ``c4:fusion`` features, C chosen by
  cross-validation on the train part (``choose_c``);
- ``mean``: the mean of the two c4 members' class probabilities, with equal weights fixed before
  any figure was seen (no weight is tuned).

The val part (210 images) is reported for every member, the test part (420) once. 95 %
percentile-bootstrap intervals over test images.

Usage:
    python benchmarks/finetune_ensemble.py [--run runs/bench/ucm_finetune]
        [--data ../shared/data/UCMerced_LandUse] [--out benchmarks/results/finetune_ensemble]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _parts(fs, manifest) -> dict[str, np.ndarray]:
    return {p: np.asarray(manifest.indices(p, fs.paths)) for p in ("train", "val", "test")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "bench" / "ucm_finetune")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "UCMerced_LandUse")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune_ensemble")
    args = ap.parse_args()
    import torch

    from landlens.data.splits import SplitManifest
    from landlens.features.cache import cached_features
    from landlens.models.classifier import load_classifier
    from landlens.training.baselines import choose_c, fit_baseline
    from landlens.training.evaluation import bootstrap_accuracy_ci

    run = args.run.resolve()
    manifest = SplitManifest.load(run / "split.json")
    model = load_classifier(run)
    cache = REPO / "runs" / "features"
    probs: dict[str, np.ndarray] = {}
    for label, name in (("finetuned", f"run:{run}"), ("finetuned c4", f"c4:run:{run}")):
        fs = cached_features(args.data, "ucmerced", name, "auto", cache_dir=cache, progress=True,
                             command="benchmarks/finetune_ensemble.py")
        with torch.no_grad():  # the head outputs log-probabilities
            probs[label] = model.head(torch.from_numpy(np.asarray(fs.features, np.float32))).exp().numpy()
    parts = _parts(fs, manifest)
    y = np.asarray(fs.labels)
    assert list(fs.classes) == list(model.classes), "class order of the run and the folder differ"
    fused = cached_features(args.data, "ucmerced", "c4:fusion", "package", cache_dir=cache, progress=True,
                            command="benchmarks/finetune_ensemble.py")
    assert list(fused.paths) == list(fs.paths)
    tr = parts["train"]
    c, search = choose_c("logreg", fused.features[tr], y[tr])
    pipe = fit_baseline("logreg", fused.features[tr], y[tr], C=c)
    probs["logreg c4:fusion"] = pipe.predict_proba(fused.features)
    probs["mean of finetuned c4 and logreg c4:fusion"] = (probs["finetuned c4"] + probs["logreg c4:fusion"]) / 2
    rows = []
    for label, p in probs.items():
        pred = p.argmax(1)
        row = {"members": label}
        for part in ("val", "test"):
            idx = parts[part]
            row[f"{part}_oa"] = round(100 * float((pred[idx] == y[idx]).mean()), 2)
            row[f"{part}_errors"] = int((pred[idx] != y[idx]).sum())
        lo, hi = bootstrap_accuracy_ci(y[parts["test"]], pred[parts["test"]])
        row["test_ci"] = [round(100 * lo, 2), round(100 * hi, 2)]
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = json.loads((run / "results.json").read_text())
    doc = {"command": "python benchmarks/finetune_ensemble.py " + " ".join(sys.argv[1:]), "run": str(run.relative_to(REPO)),
           "run_best_epoch": results.get("best_epoch"), "logreg_C": c, "logreg_C_search": search, "rows": rows,
           "parts": {k: int(len(v)) for k, v in parts.items()},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# A fine-tuned network and frozen fused features (UC Merced, 80/20 test part)\n",
             f"`{doc['command'].strip()}`  ", "`landlens train run benchmarks/configs/ucm_finetune.yaml` (the run)\n",
             f"Machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}. Split: "
             f"{doc['parts']['train']} train / {doc['parts']['val']} val / {doc['parts']['test']} test images "
             "(UC Merced 70/10/20 seed 0; the test part is 80/20 seed 0's). The run's best epoch "
             f"(by val accuracy): {doc['run_best_epoch']}; logistic regression C = {c:g} (3-fold CV on the train "
             "part). Equal weights in the mean, fixed in advance.\n",
             "| members | val OA % | val errors | test OA % | 95 % CI | test errors |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['members']} | {r['val_oa']:.2f} | {r['val_errors']} | {r['test_oa']:.2f} | "
                     f"{r['test_ci'][0]:.2f}-{r['test_ci'][1]:.2f} | {r['test_errors']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
