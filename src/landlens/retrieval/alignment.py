"""Image-text alignment with locked towers: small projection heads trained by InfoNCE (LiT-style).

The image tower (any landlens backbone or fusion; its features come from the feature store) and
the text tower (:mod:`landlens.models.text`) stay frozen. :class:`Alignment` learns one linear
projection for each into a shared space of ``dim`` dimensions, L2-normalised, with the symmetric
contrastive loss of CLIP (Radford et al., ICML 2021, eq. in Fig. 3; van den Oord et al. 2018,
InfoNCE) and a learnable temperature, as LiT does with a locked image tower (Zhai et al., CVPR
2022). Captions come from a captions file (:func:`read_captions`: UCM-captions' JSON layout,
``{"images": [{"image": PATH, "split": "train"|"val"|"test", "sentences": [...]}]}``, paths
relative to the dataset folder).

:func:`recall_at_k` scores text-to-image and image-to-text retrieval (R@k: the share of queries
with a relevant item among the first k).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from landlens.errors import LandlensError


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a captions file: its path relative to the dataset folder, split and sentences."""

    image: str
    split: str
    sentences: tuple[str, ...]


def read_captions(path: str | os.PathLike[str]) -> list[CaptionedImage]:
    """The images of a captions file (module docstring), in file order.

    Raises:
        LandlensError: a missing or malformed file, naming what is wrong.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LandlensError(f"cannot read captions file {p}: {exc}") from None
    items = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise LandlensError(f"{p}: expected {{\"images\": [{{\"image\", \"split\", \"sentences\"}}, ...]}}")
    out = []
    for i, it in enumerate(items):
        try:
            sentences = tuple(str(s) for s in it["sentences"])
            out.append(CaptionedImage(str(it["image"]), str(it.get("split", "train")), sentences))
        except (KeyError, TypeError):
            raise LandlensError(f"{p}: image entry {i} lacks 'image' or 'sentences'") from None
        if not sentences:
            raise LandlensError(f"{p}: image {it['image']!r} has no sentences")
    return out


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows: ``(CE(s, I) + CE(s^T, I)) / 2`` with
    ``s = exp(logit_scale) * image @ text^T`` on L2-normalised rows (row i of each is a pair)."""
    logits = logit_scale.exp() * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


class Alignment(nn.Module):
    """Linear projections of frozen image and text features into one normalised space.

    Settings (``__init__``): ``image_dim``, ``text_dim``, ``dim`` (shared space), ``temperature``
    (initial; learned), ``identities`` (what produced the features: recorded, and checked by
    :meth:`check`). Train with :meth:`fit`; :meth:`images` / :meth:`texts` project features.
    """

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256, temperature: float = 0.07,
                 identities: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.image_proj = nn.Linear(int(image_dim), int(dim), bias=False)
        self.text_proj = nn.Linear(int(text_dim), int(dim), bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))
        self.identities = dict(identities or {})

    def images(self, x: Any) -> np.ndarray:
        with torch.inference_mode():
            z = self.image_proj(torch.as_tensor(np.asarray(x, np.float32)))
            return nn.functional.normalize(z, dim=1).numpy()

    def texts(self, t: Any) -> np.ndarray:
        with torch.inference_mode():
            z = self.text_proj(torch.as_tensor(np.asarray(t, np.float32)))
            return nn.functional.normalize(z, dim=1).numpy()

    def fit(self, image_feats: np.ndarray, text_feats: np.ndarray, image_of_text: Sequence[int], *,
            epochs: int = 30, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
            seed: int = 0) -> list[float]:
        """Train on caption ``j`` (row of ``text_feats``) paired with image ``image_of_text[j]``;
        a batch holds each image at most once (its captions are not negatives of each other).
        Returns the mean loss of each epoch."""
        g = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        img = torch.as_tensor(np.asarray(image_feats, np.float32))
        txt = torch.as_tensor(np.asarray(text_feats, np.float32))
        owner = torch.as_tensor(np.asarray(image_of_text, np.int64))
        captions_of = [torch.nonzero(owner == i).flatten() for i in range(len(img))]
        with_caption = torch.tensor([i for i, c in enumerate(captions_of) if len(c)], dtype=torch.int64)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        history = []
        self.train()
        for _ in range(int(epochs)):
            order = with_caption[torch.randperm(len(with_caption), generator=g)]
            losses = []
            for s in range(0, len(order), batch_size):
                ids = order[s:s + batch_size]
                if len(ids) < 2:
                    continue
                pick = torch.stack([captions_of[int(i)][torch.randint(len(captions_of[int(i)]), (1,), generator=g)]
                                    for i in ids]).flatten()
                zi = nn.functional.normalize(self.image_proj(img[ids]), dim=1)
                zt = nn.functional.normalize(self.text_proj(txt[pick]), dim=1)
                loss = info_nce(zi, zt, self.logit_scale.clamp(max=np.log(100.0)))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)) if losses else float("nan"))
        self.eval()
        return history


def recall_at_k(similarity: np.ndarray, relevant: Sequence[set[int]], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k of each row of ``similarity`` (queries x items, higher is closer): the share of queries
    whose first k items hold one of ``relevant[q]``."""
    sim = np.asarray(similarity)
    order = np.argsort(-sim, axis=1, kind="stable")
    out = {}
    for k in ks:
        top = order[:, :k]
        out[f"R@{k}"] = float(np.mean([bool(relevant[q] & set(top[q].tolist())) for q in range(len(sim))]))
    return out


__all__ = ["Alignment", "CaptionedImage", "info_nce", "read_captions", "recall_at_k"]
