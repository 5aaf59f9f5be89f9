"""Search by words on UC Merced, offline: locked image and text towers, InfoNCE projection heads.

UCM-captions (``../shared/data/UCMerced_LandUse/captions.json``, the standard 1,680/210/210 split).
Image features: packaged offline backbones from the shared feature cache (one, or several fused);
text: the packaged all-MiniLM-L6-v2 (:mod:`landlens.models.text`). Heads are trained on the
train split; the shared dimension, temperature and epochs are chosen by text-to-image mean
recall on the val split, never the test split. Reported on the test split: text-to-image
(1,050 captions query 210 images) and image-to-text (210 images query 1,050 captions) R@1/5/10
and their mean, beside published CLIP-family figures on the same split.

Captions are templated (about 2,000 distinct sentences of 10,500): the same sentence describes
several images, so a text query's R@1 is capped; the ceiling (the share of test captions whose
sentence belongs to one test image only) is reported too.

Usage::

    python benchmarks/text_search.py [--backbones tf_efficientnet_lite0 ...] [--out benchmarks/results/text_search]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
UCM = REPO.parent / "shared" / "data" / "UCMerced_LandUse"
PUBLISHED = {"RemoteCLIP ViT-B-32": {"R@1": 17.62, "R@5": 61.43, "R@10": 93.81},
             "CLIP ViT-B-32": {"R@1": 8.57, "R@10": 60.57}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=UCM)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0"])
    ap.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "features")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "text_search")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from landlens.features.cache import extract
    from landlens.features.fusion import fuse
    from landlens.models.text import create_text_tower
    from landlens.retrieval.alignment import Alignment, read_captions, recall_at_k

    t0 = time.perf_counter()
    caps = read_captions(args.data / "captions.json")
    sets = [extract(args.data, b, "package", dataset="ucmerced", cache_dir=args.cache_dir) for b in args.backbones]
    fs = fuse(sets) if len(sets) > 1 else sets[0]
    row = {p: i for i, p in enumerate(fs.paths)}
    images = np.asarray(fs.features, np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    tower = create_text_tower("minilm")
    split = {s: [c for c in caps if c.split == s] for s in ("train", "val", "test")}

    def part(name):  # image rows, caption vectors, owner (index into rows) of each caption, sentences
        items = split[name]
        rows = [row[c.image.split("/", 1)[1]] for c in items]
        sentences = [s for c in items for s in c.sentences]
        owner = [i for i, c in enumerate(items) for _ in c.sentences]
        return np.asarray(rows), tower.encode(sentences), np.asarray(owner), sentences

    parts = {name: part(name) for name in split}

    def scores(model, name):
        rows, txt, owner, _ = parts[name]
        zi, zt = model.images(images[rows]), model.texts(txt)
        sim = zt @ zi.T  # captions x images
        t2i = recall_at_k(sim, [{int(o)} for o in owner])
        i2t = recall_at_k(sim.T, [set(np.flatnonzero(owner == i).tolist()) for i in range(len(rows))])
        mean = float(np.mean([*t2i.values(), *i2t.values()]))
        return {"text_to_image": t2i, "image_to_text": i2t, "mean_recall": mean, "t2i_mean": float(np.mean(list(t2i.values())))}

    rows_tr, txt_tr, owner_tr, _ = parts["train"]
    grid = list(itertools.product((128, 256), (0.05, 0.1), (20, 60)))
    tried = []
    for dim, temp, epochs in grid:
        m = Alignment(images.shape[1], txt_tr.shape[1], dim=dim, temperature=temp)
        m.fit(images[rows_tr], txt_tr, owner_tr, epochs=epochs, seed=0)
        val = scores(m, "val")
        tried.append({"dim": dim, "temperature": temp, "epochs": epochs, "val": val})
        print(f"dim {dim} T {temp} epochs {epochs}: val t2i {val['text_to_image']} mean recall {100 * val['mean_recall']:.2f}",
              flush=True)
    best = max(tried, key=lambda r: r["val"]["t2i_mean"])
    m = Alignment(images.shape[1], txt_tr.shape[1], dim=best["dim"], temperature=best["temperature"])
    m.fit(images[rows_tr], txt_tr, owner_tr, epochs=best["epochs"], seed=0)
    test = scores(m, "test")
    _, _, owner_te, sent_te = parts["test"]
    # identical sentences are identical queries with one ranking: at most the captions of the image
    # ranked first can be right, so R@1 <= sum over sentences of max_image count(sentence, image) / captions
    counts: dict[str, dict[int, int]] = {}
    for s, o in zip(sent_te, owner_te):
        counts.setdefault(s, {}).setdefault(int(o), 0)
        counts[s][int(o)] += 1
    ceiling = float(sum(max(c.values()) for c in counts.values()) / len(sent_te))
    doc = {"command": "python benchmarks/text_search.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "image_tower": args.backbones, "text_tower": tower.info.to_dict(), "grid_tried": tried,
           "chosen_on_val": {k: best[k] for k in ("dim", "temperature", "epochs")}, "test": test,
           "t2i_R1_ceiling": ceiling, "published": PUBLISHED, "torch": torch.__version__,
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    pct = lambda d, k: f"{100 * d[k]:.2f}" if k in d else "-"  # noqa: E731
    t2i, i2t = test["text_to_image"], test["image_to_text"]
    lines = ["# Search by words on UC Merced (UCM-captions test split), offline", "", f"Command: `{doc['command']}`", "",
             f"Image tower: {' + '.join(args.backbones)} (packaged weights, frozen); text tower: all-MiniLM-L6-v2 "
             f"(packaged, frozen); linear InfoNCE heads trained on the 1,680 train images, settings chosen on val "
             f"(dim {best['dim']}, initial temperature {best['temperature']}, {best['epochs']} epochs) among {len(grid)}.", "",
             "| model | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | mean recall |", "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| landlens offline ({'+'.join(args.backbones)} + MiniLM) | {pct(t2i, 'R@1')} | {pct(t2i, 'R@5')} | {pct(t2i, 'R@10')} | "
             f"{pct(i2t, 'R@1')} | {pct(i2t, 'R@5')} | {pct(i2t, 'R@10')} | {100 * test['mean_recall']:.2f} |"]
    for name, v in PUBLISHED.items():
        lines.append(f"| {name} (published) | {v.get('R@1', '-')} | {v.get('R@5', '-')} | {v.get('R@10', '-')} | - | - | - | - |")
    lines += ["", f"Text-to-image R@1 ceiling from templated captions: {100 * ceiling:.2f} % (identical sentences are "
                  f"identical queries with one ranking, so only the captions of the image ranked first can be right: "
                  f"the sum over distinct sentences of their largest count on one image, over all test captions).",
              "", f"Wall time {doc['seconds']} s on this machine's CPU (extraction reused from the feature cache)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
