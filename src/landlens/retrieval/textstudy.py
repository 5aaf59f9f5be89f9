"""Train and evaluate image-text alignments on a captions file (what ``landlens retrieval align``,
``landlens retrieval evaluate-text`` and ``benchmarks/text_search.py`` run).

:func:`image_features` gives the locked image tower's features of a labelled folder (one
backbone, or several fused by concatenating their L2-normalised features) from the shared
feature cache; :func:`encode_cached` the text tower's vectors of sentences, cached beside them.
:func:`train_alignment` fits the heads on the captions of the train split (plus, optionally, the
class-name prompts of the folder's labels); :func:`evaluate_text` scores text-to-image and
image-to-text R@1/5/10 on a split, and :func:`evaluate_zero_shot` the accuracy of zero-shot
labels on a labelled folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landlens.data.captions import CaptionedImage, CaptionsError, match_captions, read_captions
from landlens.errors import LandlensError
from landlens.retrieval.alignment import Alignment, recall_at_k
from landlens.retrieval.textspace import (
    DEFAULT_TEMPLATES, TextSpace, class_prompts, readable_class_name, tower_vocabulary, zero_shot,
)


def image_features(data: str | os.PathLike[str] | Sequence[str], backbones: Sequence[str] | str,
                   weights: Sequence[str] | str = "auto", *, dataset: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> Any:
    """The features of a folder (or a list of image files) under one backbone or the
    concatenation of several (each block L2-normalised, no PCA, so an alignment can rebuild it
    for new images), via the feature cache. ``weights``: one for all backbones or one each."""
    from landlens.features.cache import DEFAULT_CACHE_DIR, extract
    from landlens.features.fusion import fuse

    names = [backbones] if isinstance(backbones, str) else list(backbones)
    ws = [weights] * len(names) if isinstance(weights, str) else list(weights)
    if not names:
        raise LandlensError("name at least one image backbone")
    if len(ws) == 1 and len(names) > 1:
        ws = ws * len(names)
    if len(ws) != len(names):
        raise LandlensError(f"{len(ws)} weights for {len(names)} backbones: give one for all or one each")
    src = data if isinstance(data, (str, os.PathLike)) else [str(p) for p in data]
    sets = [extract(src, b, w, dataset=dataset, cache_dir=cache_dir or DEFAULT_CACHE_DIR, progress=progress)
            for b, w in zip(names, ws)]
    fs = fuse(sets) if len(sets) > 1 else sets[0]
    fs = fs.only_valid()
    fs.meta = {**fs.meta, "extractors": [{"backbone": b, "weights": w} for b, w in zip(names, ws)]}
    return fs


def image_tower_identity(fs: Any) -> dict[str, Any]:
    """What an alignment records of its image tower: the features' identity (compared with the
    features it is later given) and, under ``extractors``, the weights to rebuild each backbone."""
    from landlens.features.store import features_identity

    ident = features_identity(fs.meta, int(np.asarray(fs.features).shape[1]))
    if (fs.meta or {}).get("fusion", {}).get("pca_dim"):
        raise LandlensError("an alignment needs image features it can rebuild: fuse without PCA")
    if (fs.meta or {}).get("extractors"):
        ident["extractors"] = fs.meta["extractors"]
    return ident


def encode_cached(tower: Any, sentences: Sequence[str], cache_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The text tower's vectors of ``sentences``, cached under ``CACHE/text/<tower>-<digest>.npy``."""
    from landlens.atomic import atomic_path
    from landlens.features.cache import DEFAULT_CACHE_DIR

    h = hashlib.sha256(tower.info.digest.encode())
    for s in sentences:
        h.update(s.encode() + b"\n")
    path = Path(cache_dir or DEFAULT_CACHE_DIR) / "text" / f"{tower.info.name}-{h.hexdigest()[:16]}.npy"
    if path.is_file():
        try:
            out = np.load(path)
            if out.shape == (len(sentences), tower.dim):
                return out
        except (OSError, ValueError):
            pass
    out = tower.encode(list(sentences))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, out)
    return out


@dataclass
class CaptionPart:
    """The captioned images of one split: their feature rows, sentences and each sentence's image."""

    rows: np.ndarray  # (images,) rows of the feature set
    sentences: list[str]
    owner: np.ndarray  # (sentences,) index into rows

    def relevant_images(self) -> list[set[int]]:
        return [{int(o)} for o in self.owner]

    def relevant_sentences(self) -> list[set[int]]:
        return [set(np.flatnonzero(self.owner == i).tolist()) for i in range(len(self.rows))]


def caption_parts(captions: str | os.PathLike[str], fs: Any,
                  items: Sequence[CaptionedImage] | None = None) -> dict[str, CaptionPart]:
    """The captions file's splits matched to the rows of ``fs`` (paths relative to its root)."""
    items = list(items) if items is not None else read_captions(captions)
    rows = match_captions(captions, items, fs.meta["dataset"]["root"], fs.paths)
    out = {}
    for split in ("train", "val", "test"):
        sel = [(r, it) for r, it in zip(rows, items) if it.split == split]
        if sel:
            out[split] = CaptionPart(np.array([r for r, _ in sel]), [s for _, it in sel for s in it.sentences],
                                     np.array([i for i, (_, it) in enumerate(sel) for _ in it.sentences]))
    if "train" not in out:
        raise CaptionsError(f"{captions}: no image in the train split")
    return out


NEGATIVE_CLASS_DATASETS = ("ucmerced", "patternnet", "nwpu-resisc45", "aid", "whu-rs19", "siri-whu")
"""Catalog datasets whose class names :func:`train_alignment` adds to the class-prompt term as
negatives by default (EuroSAT is left out: ``benchmarks/text_search.py`` labels it zero-shot)."""


def catalog_class_names(datasets: Sequence[str] = NEGATIVE_CLASS_DATASETS) -> tuple[str, ...]:
    """The class folder names of catalog ``datasets``, in catalog order."""
    from landlens.data.catalog import get_spec

    return tuple(c for d in datasets for c in get_spec(d).classes)


def train_alignment(fs: Any, tower: Any, captions: str | os.PathLike[str], *, head: str = "linear", dim: int = 1024,
                    temperature: float = 0.1, epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
                    weight_decay: float = 1e-4, hidden: int = 1024, shared_positives: bool = False,
                    class_weight: float = 0.3, templates: Sequence[str] = DEFAULT_TEMPLATES,
                    extra_classes: Sequence[str] | None = None, seed: int = 0,
                    cache_dir: str | os.PathLike[str] | None = None) -> Alignment:
    """Heads trained on the captions of the train split of ``captions`` over the image features
    ``fs`` (:func:`image_features`) and the text tower ``tower``. With ``class_weight > 0`` the
    class names of ``fs`` (train-split images' labels only) add the prompts-as-classifier term
    (:meth:`Alignment.fit`) with the prompt ``templates``; ``extra_classes`` (default: the class
    names of :data:`NEGATIVE_CLASS_DATASETS`; ``()`` for none) join it as negatives only, without
    images (a name that reads like one of ``fs``'s classes is skipped). The same ``seed`` gives
    the same heads whatever ran before.

    The defaults are the recipe ``benchmarks/text_search.py`` chose on val splits
    (``benchmarks/results/text_search.md``): linear heads, 1,024 dimensions, initial temperature
    0.1, 20 epochs at lr 1e-3 (chosen on the UCM-captions val split with Lite0+SqueezeNet+GeoEmbed
    features; MLP heads, other widths, temperatures, epochs and multi-positive sentences scored
    lower), and class weight 0.3 with :data:`~landlens.retrieval.textspace.DEFAULT_TEMPLATES` and
    other datasets' class names as negatives (chosen by zero-shot accuracy on the EuroSAT val part,
    +2.6 points there for -0.4 of UCM val text-to-image mean recall)."""
    parts = caption_parts(captions, fs)
    tr = parts["train"]
    feats = np.asarray(fs.features, np.float32)
    text = encode_cached(tower, tr.sentences, cache_dir)
    with torch.random.fork_rng():  # the heads' initial weights follow the seed, not what ran before
        torch.manual_seed(int(seed))
        model = Alignment(feats.shape[1], tower.dim, dim, head=head, hidden=hidden, temperature=temperature,
                          image_tower=image_tower_identity(fs), text_tower=tower.info.to_dict())
    labels = class_texts = None
    if class_weight > 0:
        labels = np.asarray(fs.labels)[tr.rows]
        words = tower_vocabulary(tower)
        names = [readable_class_name(c, words) for c in fs.classes]
        extra = catalog_class_names() if extra_classes is None else extra_classes
        names += [n for n in dict.fromkeys(readable_class_name(c, words) for c in extra) if n not in names]
        prompts = class_prompts(names, templates)
        flat = encode_cached(tower, [p for ps in prompts for p in ps], cache_dir)
        class_texts = flat.reshape(len(names), len(templates), -1)
    losses = model.fit(feats[tr.rows], text, tr.owner, labels=labels, class_texts=class_texts,
                       class_weight=class_weight, epochs=epochs, batch_size=batch_size, lr=lr,
                       weight_decay=weight_decay, shared_positives=shared_positives, seed=seed)
    model.trained = {"captions": str(Path(captions).resolve()), "images": int(len(tr.rows)),
                     "sentences": len(tr.sentences), "head": head, "dim": dim, "temperature": temperature,
                     "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                     "shared_positives": shared_positives, "class_weight": class_weight,
                     "classes": list(fs.classes) if class_weight > 0 else [],
                     "extra_classes": list(names[len(fs.classes):]) if class_weight > 0 else [],
                     "templates": list(templates) if class_weight > 0 else [], "seed": seed,
                     "final_loss": losses[-1] if losses else None}
    return model


def evaluate_text(space: TextSpace, fs: Any, captions: str | os.PathLike[str], split: str = "test",
                  ks: Sequence[int] = (1, 5, 10), cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Text-to-image and image-to-text R@k (and their mean) on one split of a captions file, and
    the text-to-image R@1 ceiling of that split (identical sentences are one query with one
    ranking: at most the captions of the image ranked first can be right)."""
    space.alignment.check_images(image_tower_identity(fs))
    parts = caption_parts(captions, fs)
    if split not in parts:
        raise CaptionsError(f"{captions}: no image in the {split!r} split")
    part = parts[split]
    zi = space.images(np.asarray(fs.features, np.float32)[part.rows])
    zt = space.alignment.texts(encode_cached(space.tower, part.sentences, cache_dir))
    sim = zt @ zi.T
    t2i = recall_at_k(sim, part.relevant_images(), ks)
    i2t = recall_at_k(sim.T, part.relevant_sentences(), ks)
    counts: dict[str, dict[int, int]] = {}
    for s, o in zip(part.sentences, part.owner):
        counts.setdefault(s, {}).setdefault(int(o), 0)
        counts[s][int(o)] += 1
    ceiling = sum(max(c.values()) for c in counts.values()) / len(part.sentences)
    return {"split": split, "images": int(len(part.rows)), "sentences": len(part.sentences),
            "text_to_image": t2i, "image_to_text": i2t, "mean_recall": float(np.mean([*t2i.values(), *i2t.values()])),
            "t2i_R1_ceiling": float(ceiling)}


def evaluate_zero_shot(space: TextSpace, fs: Any, classes: Sequence[str] | None = None,
                       templates: Sequence[str] = DEFAULT_TEMPLATES, rows: Sequence[int] | None = None) -> dict[str, Any]:
    """Zero-shot accuracy on labelled features ``fs`` (``rows``: a subset): every image labelled
    with the most probable of ``classes`` (default: the folder's class names), prompts from
    ``templates``."""
    space.alignment.check_images(image_tower_identity(fs))
    names = list(classes) if classes is not None else list(fs.classes)
    if len(names) != len(fs.classes):
        raise LandlensError(f"{len(names)} class names for the folder's {len(fs.classes)} classes")
    sel = np.arange(len(fs.paths)) if rows is None else np.asarray(rows, dtype=np.int64)
    probs = zero_shot(space, np.asarray(fs.features, np.float32)[sel], names, templates)
    pred = probs.argmax(1)
    truth = np.asarray(fs.labels)[sel]
    per_class = {fs.classes[c]: float((pred[truth == c] == c).mean()) for c in range(len(fs.classes)) if (truth == c).any()}
    return {"images": int(len(sel)), "accuracy": float((pred == truth).mean()), "per_class": per_class,
            "class_names": names, "templates": list(templates),
            "confusion": np.bincount(truth * len(names) + pred, minlength=len(names) ** 2).reshape(len(names), -1).tolist()}


def align_text(data: str | os.PathLike[str], captions: str | os.PathLike[str], out: str | os.PathLike[str], *,
          backbones: Sequence[str] | str = "fusion", weights: Sequence[str] | str = "auto",
          text: str = "minilm", text_weights: str = "package", dataset: str | None = None,
          cache_dir: str | os.PathLike[str] | None = None, progress: bool = False, **settings: Any) -> tuple[Alignment, dict[str, Any]]:
    """What ``landlens retrieval align`` runs: image features of ``data`` (the folder the
    captions file describes), the text tower, :func:`train_alignment` with ``settings``, the
    file written to ``out``, and R@k on the val split when the captions file has one:
    ``(alignment, report)``. The default image tower is the ``fusion`` backbone, the one
    archives are built with by default (UCM-captions val mean recall 53 against 51 for
    EfficientNet-Lite0 alone)."""
    import time

    from landlens.models.text import create_text_tower
    from landlens.retrieval.textspace import TextSpace

    t0 = time.perf_counter()
    fs = image_features(data, backbones, weights, dataset=dataset, cache_dir=cache_dir, progress=progress)
    tower = create_text_tower(text, text_weights)
    model = train_alignment(fs, tower, captions, cache_dir=cache_dir, **settings)
    model.save(out)
    report: dict[str, Any] = {"alignment": str(out), "image_tower": model.image_tower.get("extractors"),
                              "text_tower": tower.info.to_dict(), "trained": model.trained}
    if "val" in caption_parts(captions, fs):
        report["val"] = evaluate_text(TextSpace(model, tower), fs, captions, "val", cache_dir=cache_dir)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return model, report


def clip_alignment(backbone: str, weights: str, text: str | None = None, text_weights: str | None = None,
                   out: str | os.PathLike[str] | None = None, temperature: float = 0.01) -> Alignment:
    """The ``identity`` alignment of a CLIP-family model, whose towers share one space already:
    the image tower ``backbone`` (e.g. ``openclip:ViT-B-32`` with a checkpoint file) and the text
    tower ``text`` (default: the same name and weights), both recorded so archives and zero-shot
    labels check them like a trained alignment. ``temperature`` sets the zero-shot softmax
    (CLIP's learned scale is 100, i.e. 0.01). Written to ``out`` when given."""
    from landlens.models.registry import create_backbone
    from landlens.models.text import create_text_tower

    bb = create_backbone(backbone, weights)
    tower = create_text_tower(text or backbone, text_weights or weights)
    if bb.num_features != tower.dim:
        raise LandlensError(f"{backbone} gives {bb.num_features}-d images and {tower.info.name} {tower.dim}-d "
                            f"sentences: not one space; train heads with `landlens retrieval align` instead")
    ident = {"backbone": bb.name, "weights_digest": bb.weights.digest, "preprocessing": bb.preprocessing.to_dict(),
             "dim": bb.num_features, "extractors": [{"backbone": backbone, "weights": weights}]}
    model = Alignment(bb.num_features, tower.dim, tower.dim, head="identity", temperature=temperature,
                      image_tower=ident, text_tower=tower.info.to_dict())
    model.trained = {"head": "identity", "dim": tower.dim, "epochs": 0, "images": 0, "sentences": 0,
                     "note": "a CLIP-family model's own towers; nothing trained"}
    if out is not None:
        model.save(out)
    return model


def alignment_features(space: TextSpace, data: str | os.PathLike[str] | Sequence[str], *,
                       dataset: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                       progress: bool = False) -> Any:
    """Features of ``data`` under the image tower an alignment records (its backbones and
    weights), through the feature cache."""
    ex = space.alignment.image_tower.get("extractors")
    if not ex:
        raise LandlensError("the alignment does not record how to rebuild its image tower; give features instead")
    return image_features(data, [e["backbone"] for e in ex], [e["weights"] for e in ex], dataset=dataset,
                          cache_dir=cache_dir, progress=progress)


class AlignedImageTower:
    """The image tower an alignment records, rebuilt to embed new image files: each backbone
    from its recorded weights, each block L2-normalised and concatenated as
    :func:`~landlens.features.fusion.fuse` does, checked against the recorded identity."""

    def __init__(self, space: TextSpace) -> None:
        from landlens.features.fusion import Fusion
        from landlens.models.registry import create_backbone

        ex = space.alignment.image_tower.get("extractors")
        if not ex:
            raise LandlensError("the alignment does not record how to rebuild its image tower")
        self.space = space
        self.backbones = [create_backbone(e["backbone"], e["weights"]).eval() for e in ex]
        dims = sum(b.num_features for b in self.backbones)
        self.fusion = Fusion().fit([np.zeros((1, b.num_features), np.float32) for b in self.backbones]) \
            if len(self.backbones) > 1 else None
        ident: dict[str, Any] = {"dim": dims}
        if len(self.backbones) == 1:
            b = self.backbones[0]
            ident.update(backbone=b.name, weights_digest=b.weights.digest, preprocessing=b.preprocessing.to_dict())
        else:
            ident["fusion"] = {**self.fusion.describe(), "sources": [
                {"backbone": b.name, "weights_digest": b.weights.digest, "num_features": b.num_features}
                for b in self.backbones]}
        space.alignment.check_images(ident)

    def embed_files(self, paths: Sequence[str | os.PathLike[str]], *, max_pixels: int | None = None,
                    ) -> tuple[np.ndarray, dict[int, str]]:
        """Shared-space vectors of the readable files (in order) and, by position, why the
        others could not be read."""
        from landlens.data.io import DEFAULT_MAX_PIXELS
        from landlens.errors import ImageReadError
        from landlens.models.preprocessing import decode_image
        from landlens.retrieval.extractor import embed_images

        limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        first, ok, errors = [], [], {}
        for i, p in enumerate(paths):  # a file that one backbone cannot decode, none can
            try:
                first.append(decode_image(p, self.backbones[0].preprocessing, max_pixels=limit))
                ok.append(i)
            except ImageReadError as exc:
                errors[i] = str(exc)
        blocks = [embed_images(self.backbones[0], first)]
        for b in self.backbones[1:]:
            blocks.append(embed_images(b, [decode_image(paths[i], b.preprocessing, max_pixels=limit) for i in ok]))
        x = self.fusion.transform(blocks) if self.fusion is not None else blocks[0]
        return self.space.images(x) if len(ok) else np.zeros((0, self.space.dim), np.float32), errors


__all__ = ["NEGATIVE_CLASS_DATASETS", "AlignedImageTower", "CaptionPart", "align_text", "alignment_features",
           "caption_parts", "catalog_class_names", "clip_alignment", "encode_cached", "evaluate_text", "evaluate_zero_shot",
           "image_features", "image_tower_identity", "train_alignment"]
