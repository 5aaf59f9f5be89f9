"""Image-text alignment with locked towers: small projection heads trained by InfoNCE (LiT-style).

The image tower (any landlens backbone or fusion; its features come from the feature store) and
the text tower (:mod:`landlens.models.text`) stay frozen. :class:`Alignment` learns a head for
each (``linear``, or a two-layer ``mlp``) into a shared space of ``dim`` dimensions,
L2-normalised, with the symmetric contrastive loss of CLIP (Radford et al., ICML 2021, the
pseudo-code of Fig. 3; InfoNCE of van den Oord et al. 2018) and a learned temperature, as LiT
does with a locked image tower (Zhai et al., CVPR 2022). Optionally, class-name prompts of a
labelled folder add a second term: each image is classified against the prompts of every class
(the "prompts as classifier" loss of UniCL, Yang et al., CVPR 2022), which teaches the heads
class words that the captions never use. A CLIP-family model, whose towers are aligned
already, is an ``identity`` alignment.

An alignment is one safetensors file (:meth:`Alignment.save`) whose metadata records both
towers' identities; :meth:`Alignment.check_images` and :meth:`Alignment.check_text` refuse
features of any other tower, as the matching discriminator does.

:func:`recall_at_k` scores text-to-image and image-to-text retrieval (R@k: the share of queries
with a relevant item among the first k).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from landlens.data.captions import CaptionedImage, read_captions
from landlens.errors import CheckpointError, LandlensError

FORMAT = "landlens-alignment/1"
HEADS = ("linear", "mlp", "identity")


class AlignmentMismatchError(LandlensError):
    """Features of another image or text tower than the ones an alignment was trained on."""


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
             positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows: ``(CE(s, I) + CE(s^T, I)) / 2`` with
    ``s = exp(logit_scale) * image @ text^T`` on L2-normalised rows (row i of each is a pair).

    ``positives`` (``(n, n)`` bool, image i x text j, diagonal true) marks more pairs as matched
    (a sentence that also describes another image of the batch): each row's target is then
    spread evenly over its positives (the multi-positive contrastive loss of Khosla et al.,
    NeurIPS 2020, Eq. 2, in its cross-entropy form), instead of counting them as negatives."""
    logits = logit_scale.exp() * image @ text.T
    if positives is None:
        target = torch.arange(len(image), device=image.device)
        return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
    pos = positives.to(logits.dtype)
    return (nn.functional.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
            + nn.functional.cross_entropy(logits.T, pos.T / pos.T.sum(1, keepdim=True))) / 2


def _head(kind: str, d_in: int, d_out: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out, bias=False)
    if kind == "mlp":  # a residual-free two-layer perceptron (dropout is the regulariser)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, d_out))
    if kind == "identity":
        if d_in != d_out:
            raise LandlensError(f"an identity alignment needs equal dimensions, not {d_in} and {d_out}")
        return nn.Identity()
    raise LandlensError(f"unknown alignment head {kind!r}: use one of {', '.join(HEADS)}")


def _identity_differences(recorded: dict[str, Any], given: dict[str, Any]) -> list[str]:
    rec = json.loads(json.dumps(recorded, sort_keys=True, default=str))
    giv = json.loads(json.dumps(given, sort_keys=True, default=str))
    return sorted(k for k in set(rec) & set(giv) if rec[k] != giv[k])


class Alignment(nn.Module):
    """Heads of frozen image and text features into one normalised space (module docstring).

    Settings (``__init__``): ``image_dim``, ``text_dim``, ``dim`` (shared space), ``head``
    (``linear``, ``mlp`` or ``identity``), ``hidden`` (MLP width), ``temperature`` (initial;
    learned), ``image_tower`` and ``text_tower`` (identities, recorded in the file and checked).
    Train with :meth:`fit`; :meth:`images` / :meth:`texts` project features; :meth:`save` /
    :meth:`load` write and read the file.
    """

    def __init__(self, image_dim: int, text_dim: int, dim: int = 1024, *, head: str = "linear", hidden: int = 1024,
                 temperature: float = 0.1, image_tower: dict[str, Any] | None = None,
                 text_tower: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.settings = {"image_dim": int(image_dim), "text_dim": int(text_dim), "dim": int(dim), "head": head,
                         "hidden": int(hidden), "temperature": float(temperature)}
        self.image_head = _head(head, int(image_dim), int(dim), int(hidden))
        self.text_head = _head(head, int(text_dim), int(dim), int(hidden))
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))
        self.image_tower = dict(image_tower or {})
        self.text_tower = dict(text_tower or {})
        self.trained: dict[str, Any] = {}
        self.eval()

    @property
    def dim(self) -> int:
        return self.settings["dim"]

    # ------------------------------------------------------------------ projecting
    def _project(self, head: nn.Module, x: Any, d_in: int, what: str) -> np.ndarray:
        a = np.asarray(x, np.float32)
        if a.ndim != 2 or a.shape[1] != d_in:
            raise AlignmentMismatchError(f"{what} of shape {a.shape} do not fit this alignment, which takes "
                                         f"(n, {d_in}) {what}")
        with torch.inference_mode():
            t = nn.functional.normalize(torch.from_numpy(np.array(a)), dim=1)  # the towers' vectors, unit length
            return nn.functional.normalize(head(t), dim=1).numpy()

    def images(self, x: Any) -> np.ndarray:
        """Unit vectors in the shared space of image features ``x`` ``(n, image_dim)``."""
        return self._project(self.image_head, x, self.settings["image_dim"], "image features")

    def texts(self, t: Any) -> np.ndarray:
        """Unit vectors in the shared space of text-tower vectors ``t`` ``(n, text_dim)``."""
        return self._project(self.text_head, t, self.settings["text_dim"], "text vectors")

    # ------------------------------------------------------------------ training
    def fit(self, image_feats: np.ndarray, text_feats: np.ndarray, image_of_text: Sequence[int], *,
            labels: Sequence[int] | None = None, class_texts: np.ndarray | None = None, class_weight: float = 0.3,
            epochs: int = 20, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
            shared_positives: bool = False, seed: int = 0) -> list[float]:
        """Train on caption ``j`` (row of ``text_feats``) paired with image ``image_of_text[j]``.

        A batch holds each image at most once (its captions are not negatives of each other).
        With ``shared_positives``, a sentence that describes several images of a batch (identical
        text vectors) counts all of them as matches (:func:`info_nce` ``positives``), not as
        negatives. With ``labels`` (one class per image, ``-1`` for none) and ``class_texts``
        (``(classes, templates, text_dim)``: text vectors of every prompt template of every class;
        classes no image is labelled with are negatives only), each batch adds ``class_weight``
        times the cross-entropy of its labelled images against one random template of every
        class. Returns the mean loss of each epoch. The defaults (and those of ``__init__``) are
        the recipe of :func:`landlens.retrieval.textstudy.train_alignment`.
        """
        if self.settings["head"] == "identity":
            raise LandlensError("an identity alignment has nothing to train")
        g = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        img = nn.functional.normalize(torch.as_tensor(np.asarray(image_feats, np.float32)), dim=1)
        txt = nn.functional.normalize(torch.as_tensor(np.asarray(text_feats, np.float32)), dim=1)
        owner = torch.as_tensor(np.asarray(image_of_text, np.int64))
        captions_of = [torch.nonzero(owner == i).flatten() for i in range(len(img))]
        if shared_positives:  # has_sentence[i, s]: image i is described by distinct sentence s
            _, sid_np = np.unique(txt.numpy(), axis=0, return_inverse=True)
            sid = torch.as_tensor(sid_np.reshape(-1), dtype=torch.int64)
            has_sentence = torch.zeros(len(img), int(sid.max()) + 1 if len(sid) else 0, dtype=torch.bool)
            has_sentence[owner, sid] = True
        use_classes = labels is not None and class_texts is not None and class_weight > 0
        if use_classes:
            y = torch.as_tensor(np.asarray(labels, np.int64))
            ct = nn.functional.normalize(torch.as_tensor(np.asarray(class_texts, np.float32)), dim=-1)
            if ct.ndim != 3 or len(y) != len(img):
                raise LandlensError("class_texts must be (classes, templates, dim) and labels one per image")
        pool = [i for i, c in enumerate(captions_of) if len(c) or (use_classes and int(y[i]) >= 0)]
        pool_t = torch.tensor(pool, dtype=torch.int64)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        steps = max(1, int(epochs) * ((len(pool) + batch_size - 1) // batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        history = []
        self.train()
        for _ in range(int(epochs)):
            order = pool_t[torch.randperm(len(pool_t), generator=g)]
            losses = []
            for s in range(0, len(order), batch_size):
                ids = order[s:s + batch_size]
                if len(ids) < 2:
                    continue
                scale = self.logit_scale.clamp(max=float(np.log(100.0)))
                zi = nn.functional.normalize(self.image_head(img[ids]), dim=1)
                loss = torch.zeros(())
                has = [k for k, i in enumerate(ids.tolist()) if len(captions_of[i])]
                if len(has) >= 2:
                    pick = torch.stack([captions_of[int(ids[k])][torch.randint(len(captions_of[int(ids[k])]), (1,),
                                                                              generator=g)] for k in has]).flatten()
                    zt = nn.functional.normalize(self.text_head(txt[pick]), dim=1)
                    pos = has_sentence[ids[has]][:, sid[pick]] if shared_positives else None
                    loss = loss + info_nce(zi[has], zt, scale, pos)
                if use_classes:
                    yb = y[ids]
                    lab = yb >= 0
                    if lab.any():
                        t = torch.randint(ct.shape[1], (ct.shape[0],), generator=g)
                        zc = nn.functional.normalize(self.text_head(ct[torch.arange(ct.shape[0]), t]), dim=1)
                        logits = scale.exp() * zi[lab] @ zc.T
                        loss = loss + class_weight * nn.functional.cross_entropy(logits, yb[lab])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)) if losses else float("nan"))
        self.eval()
        return history

    # ------------------------------------------------------------------ identities
    def check_images(self, identity: dict[str, Any]) -> None:
        """Refuse image features of another tower than the recorded one (keys present in both
        compared, e.g. ``backbone``, ``weights_digest``, ``preprocessing``, ``fusion``, ``dim``).

        Raises:
            AlignmentMismatchError: one line naming both identities.
        """
        recorded = {k: v for k, v in self.image_tower.items() if k != "extractors"}  # how to rebuild, not what
        differ = _identity_differences(recorded, identity)
        if differ:
            raise AlignmentMismatchError(
                f"this alignment was trained on image features of {_short(self.image_tower)}, these come from "
                f"{_short(identity)} (differ in {', '.join(differ)})")

    def check_text(self, info: dict[str, Any]) -> None:
        """Refuse a text tower other than the recorded one (name, digest, dim, pooling compared)."""
        keys = ("name", "digest", "dim", "pooling")
        differ = _identity_differences({k: self.text_tower.get(k) for k in keys if k in self.text_tower},
                                       {k: info.get(k) for k in keys if k in info})
        if differ:
            raise AlignmentMismatchError(
                f"this alignment was trained with text tower {_short(self.text_tower)}, not {_short(info)} "
                f"(differ in {', '.join(differ)})")

    # ------------------------------------------------------------------ the file
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the heads and both towers' identities to one safetensors file (atomically)."""
        from safetensors.torch import save_file

        from landlens.atomic import atomic_path

        p = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "settings": json.dumps(self.settings), "image_tower": json.dumps(self.image_tower),
                "text_tower": json.dumps(self.text_tower), "trained": json.dumps(self.trained, default=str)}
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Alignment":
        """Read a file written by :meth:`save`.

        Raises:
            CheckpointError: a missing file, not an alignment file, or tensors that do not fit.
        """
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"alignment file not found: {p}")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{p} is not a safetensors file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{p} is not a landlens alignment file (format {meta.get('format')!r}, "
                                  f"expected {FORMAT!r})")
        try:
            settings = json.loads(meta["settings"])
            model = cls(settings["image_dim"], settings["text_dim"], settings["dim"], head=settings["head"],
                        hidden=settings["hidden"], temperature=settings["temperature"],
                        image_tower=json.loads(meta["image_tower"]), text_tower=json.loads(meta["text_tower"]))
            model.load_state_dict(tensors, strict=True)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{p}: damaged alignment file ({str(exc).splitlines()[0][:200]})") from None
        model.trained = json.loads(meta.get("trained") or "{}")
        return model.eval()

    def __repr__(self) -> str:
        s = self.settings
        return (f"Alignment({s['head']}, {s['image_dim']}->{s['dim']}<-{s['text_dim']}, "
                f"image={_short(self.image_tower)}, text={_short(self.text_tower)})")


def _short(identity: dict[str, Any]) -> str:
    if not identity:
        return "(unrecorded)"
    fusion = identity.get("fusion")
    name = "+".join(str(s.get("backbone")) for s in fusion["sources"]) if isinstance(fusion, dict) and fusion.get(
        "sources") else identity.get("backbone") or identity.get("name")
    digest = identity.get("weights_digest") or identity.get("digest") or ""
    return f"{name} ({str(digest)[:12]}, {identity.get('dim')}-d)"


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


__all__ = ["FORMAT", "HEADS", "Alignment", "AlignmentMismatchError", "CaptionedImage", "info_nce", "read_captions",
           "recall_at_k"]
