"""A fine-tuned network and frozen fused features, alone and averaged (issue #16).

Members, all trained on the *train* part of the run's split:

- ``finetuned``: the run's fine-tuned classifier (epoch chosen on the val part), one forward pass;
- ``finetuned c4``: the same network with its pooled features averaged over the four 90-degree
  rotations (``c4:run:RUN``); the head is linear, so this is the mean of the four logits;
- ``finetuned d4``: the same over the eight rotations and mirror images (``d4:run:RUN``);
- ``logreg FUSED``: logistic regression on frozen features (``--fused``, default ``c4:fusion``),
  C chosen by cross-validation on the train part (``choose_c``);
- ``mean``: the mean of ``finetuned c4``'s and the logistic regression's class probabilities,
  with equal weights fixed before any figure was seen (no weight is tuned).

The run's members are extracted for the val and test parts only. The val part is reported for
every member, the test part once; the row a user should take is the one with the highest val
accuracy (none when several tie). 95 % percentile-bootstrap intervals over test images.

Usage (the committed results):
    python benchmarks/finetune_ensemble.py      # UC Merced 70/10/20: runs/bench/ucm_finetune
        # (benchmarks/configs/ucm_finetune.yaml; its test part is 80/20 seed 0's)
    python benchmarks/finetune_ensemble.py --run runs/bench/eurosat_finetune --data ../shared/data/EuroSAT_RGB \
        --dataset eurosat --fused fusion --out benchmarks/results/finetune_ensemble_eurosat
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "bench" / "ucm_finetune")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "UCMerced_LandUse")
    ap.add_argument("--dataset", default="ucmerced", help="catalog name of --data")
    ap.add_argument("--fused", default="c4:fusion", help="frozen features of the logistic regression member")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune_ensemble")
    args = ap.parse_args()
    import torch

    from landlens.data.folder import scan_folder
    from landlens.data.splits import SplitManifest
    from landlens.features.cache import cached_features, cached_store
    from landlens.models.classifier import load_classifier
    from landlens.models.registry import create_backbone
    from landlens.training.baselines import choose_c, fit_baseline
    from landlens.training.evaluation import bootstrap_accuracy_ci

    run = args.run.resolve()
    manifest = SplitManifest.load(run / "split.json")
    model = load_classifier(run)
    cache = REPO / "runs" / "features"
    command = "benchmarks/finetune_ensemble.py"
    fused = cached_features(args.data, args.dataset, args.fused, "package", cache_dir=cache, progress=True,
                            command=command)
    assert list(fused.classes) == list(model.classes), "class order of the run and the folder differ"
    y = np.asarray(fused.labels)
    parts = {p: np.asarray(manifest.indices(p, fused.paths)) for p in ("train", "val", "test")}
    shown = np.concatenate([parts["val"], parts["test"]])  # positions in the folder's order
    where = {"val": np.arange(len(parts["val"])), "test": len(parts["val"]) + np.arange(len(parts["test"]))}
    probs: dict[str, np.ndarray] = {}
    ds = scan_folder(args.data, args.dataset).subset(shown)
    assert list(ds.paths) == [fused.paths[i] for i in shown]
    for label, name in (("finetuned", f"run:{run}"), ("finetuned c4", f"c4:run:{run}"),
                        ("finetuned d4", f"d4:run:{run}")):
        fs = cached_store(ds, create_backbone(name, "auto"), cache_dir=cache, progress=True, command=command)[0]
        assert list(fs.paths) == list(ds.paths), f"{name}: an image of the val or test part is unreadable"
        with torch.no_grad():  # the head outputs log-probabilities
            probs[label] = model.head(torch.from_numpy(np.asarray(fs.features, np.float32))).exp().numpy()
    tr = parts["train"]
    c, search = choose_c("logreg", fused.features[tr], y[tr])
    pipe = fit_baseline("logreg", fused.features[tr], y[tr], C=c)
    probs[f"logreg {args.fused}"] = pipe.predict_proba(fused.features[shown])
    probs[f"mean of finetuned c4 and logreg {args.fused}"] = (probs["finetuned c4"] + probs[f"logreg {args.fused}"]) / 2
    y = y[shown]
    rows = []
    for label, p in probs.items():
        pred = p.argmax(1)
        row = {"members": label}
        for part in ("val", "test"):
            idx = where[part]
            row[f"{part}_oa"] = round(100 * float((pred[idx] == y[idx]).mean()), 2)
            row[f"{part}_errors"] = int((pred[idx] != y[idx]).sum())
        lo, hi = bootstrap_accuracy_ci(y[where["test"]], pred[where["test"]])
        row["test_ci"] = [round(100 * lo, 2), round(100 * hi, 2)]
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = [r for r in rows if r["val_oa"] == max(r["val_oa"] for r in rows)]
    chosen = best[0] if len(best) == 1 else None  # a tie on val chooses nothing
    results = json.loads((run / "results.json").read_text())
    doc = {"chosen_on_val": chosen["members"] if chosen else None,
           "command": "python benchmarks/finetune_ensemble.py " + " ".join(sys.argv[1:]), "run": str(run.relative_to(REPO)),
           "run_best_epoch": results.get("best_epoch"), "logreg_C": c, "logreg_C_search": search, "rows": rows,
           "parts": {k: int(len(v)) for k, v in parts.items()},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    data_cfg = json.loads((run / "config.json").read_text())["data"]
    split = f"{data_cfg['split']} seed {data_cfg['seed']}"
    note = "; its test part is 80/20 seed 0's" if args.dataset == "ucmerced" and data_cfg["split"] == "70/10/20" else ""
    lines = [f"# A fine-tuned network and frozen features ({args.data.name}, {split} test part)\n",
             f"`{doc['command'].strip()}`  ", f"`{results['command']}` (the run)\n",
             f"Machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}. Split: "
             f"{doc['parts']['train']} train / {doc['parts']['val']} val / {doc['parts']['test']} test images "
             f"({args.data.name} {split}{note}). The run's best epoch "
             f"(by val accuracy): {doc['run_best_epoch']}; logistic regression C = {c:g} (3-fold CV on the train "
             "part). Equal weights in the mean, fixed in advance. "
             + (f"Chosen on val: {chosen['members']}.\n" if chosen else
                f"The val part does not choose: {len(best)} rows tie at {best[0]['val_oa']:.2f} %.\n"),
             "| members | val OA % | val errors | test OA % | 95 % CI | test errors |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        name = f"**{r['members']}** (chosen on val)" if r is chosen else r["members"]
        lines.append(f"| {name} | {r['val_oa']:.2f} | {r['val_errors']} | {r['test_oa']:.2f} | "
                     f"{r['test_ci'][0]:.2f}-{r['test_ci'][1]:.2f} | {r['test_errors']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
