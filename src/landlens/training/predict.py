"""Predict scene classes of image files with a trained classifier (a run directory).

A run directory holds ``model.json`` + ``model.safetensors`` written by
:func:`landlens.models.classifier.save_classifier`. :class:`Predictor` rebuilds the network with
:func:`~landlens.models.classifier.load_classifier` (no pickle) and applies the evaluation view of
the model's own :class:`~landlens.models.preprocessing.Preprocessing`: each file is decoded to
8-bit RGB by the one decode path, :func:`~landlens.models.preprocessing.decode_image` (the same
pixels training, extraction and the search service get), resized and centre-cropped with
:func:`~landlens.models.preprocessing.resize_and_crop`, and normalised per batch with
:func:`~landlens.models.preprocessing.normalize_batch`. The classifier outputs log-probabilities;
a prediction reports ``exp`` of them for the ``top_k`` most probable classes.

Inputs may be image files or folders; folders are scanned recursively for image files
(:func:`~landlens.data.io.is_image_file`, hidden files and folders skipped) in natural order of
their path relative to the folder. A file that cannot be decoded does not stop the others: its
:class:`Prediction` carries an ``error`` line instead of labels. An input that does not exist, or
a folder without any image, is a user error raised before any work is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from landlens.errors import ConfigError, DatasetError, ImageReadError, LandlensError
from landlens.models.preprocessing import Preprocessing, load_resized, normalize_batch, resize_and_crop, to_uint8_array


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, or why it could not be read.

    Attributes:
        path: the image file (as given or found in a folder); ``None`` for an in-memory image.
        labels: class names, most probable first (empty when ``error`` is set).
        probabilities: the matching probabilities ``exp(log_prob)``, non-increasing.
        error: one line (the file and the reason) when the image could not be decoded.
    """

    path: str | None
    labels: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the image was predicted (no ``error``)."""
        return self.error is None

    @property
    def label(self) -> str | None:
        """The top-1 class, or ``None`` for an unreadable image."""
        return self.labels[0] if self.labels else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: path, error, and the ranked ``top`` list of ``{label, probability}``."""
        return {
            "path": self.path,
            "error": self.error,
            "top": [{"rank": r + 1, "label": lab, "probability": float(p)}
                    for r, (lab, p) in enumerate(zip(self.labels, self.probabilities))],
        }


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Image files to predict: files as given, folders scanned recursively in natural order.

    Files given explicitly are kept whatever their extension (decoding decides); in folders only
    files with an image extension are taken, hidden files and folders skipped, sorted by the
    natural order of their path relative to the folder (``img2`` before ``img10``).

    Raises:
        DatasetError: an input that does not exist, or a folder that holds no image file.
    """
    from landlens.data.folder import natural_key
    from landlens.data.io import file_problem, is_image_file

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            seen: set[str] = set()
            for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
                real = os.path.realpath(dirpath)
                if real in seen:  # a symlink cycle: do not walk a folder twice
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    full = Path(dirpath) / name
                    rel = full.relative_to(p)
                    if _visible(rel) and is_image_file(name) and full.is_file():
                        found.append((rel.as_posix(), full))
            if not found:
                raise DatasetError(f"{p}: folder holds no image files")
            found.sort(key=lambda t: (natural_key(t[0]), t[0]))
            out.extend(full for _, full in found)
        elif file_problem(p) == "file not found":
            raise DatasetError(f"{p}: no such file or folder")
        else:
            out.append(p)  # decoding names any other problem (a FIFO, a link loop, a device)
    return out


class _DecodeDataset(torch.utils.data.Dataset):
    """File -> (index, resized uint8 HWC array or None, error line or None)."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, rgb_bands: Sequence[int] | None) -> None:
        self.paths = list(paths)
        self.pre = pre
        self.rgb_bands = list(rgb_bands) if rgb_bands is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, load_resized(self.paths[i], self.pre, rgb_bands=self.rgb_bands), None
        except LandlensError as exc:  # ImageReadError names the file; keep the others going
            msg = str(exc)
            if not isinstance(exc, ImageReadError) and str(self.paths[i]) not in msg:
                msg = f"{self.paths[i]}: {msg}"
            return i, None, msg


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


class Predictor:
    """A trained classifier ready to predict image files or PIL images.

    Args:
        run_dir: run directory holding ``model.json`` and ``model.safetensors`` (or ``model.json``).
        device: torch device to run on (``'cpu'``, ``'cuda'``, ``'cuda:1'``...).
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes that decode images (0: decode in this process).
        rgb_bands: bands shown as RGB for multi-band files (see :func:`~landlens.data.io.load_rgb`);
            by default the value recorded in ``model.json`` (``extra.rgb_bands``) when there is
            one, else ``load_rgb``'s own default.

    Raises:
        CheckpointError: the run directory has no usable ``model.json`` / ``model.safetensors``.
        ConfigError: a bad device, batch size or worker count.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, device: str = "cpu", batch_size: int = 32,
                 num_workers: int = 0, rgb_bands: Sequence[int] | None = None) -> None:
        from landlens.models.classifier import load_classifier, read_model_meta

        if int(batch_size) < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ConfigError(f"number of workers must be 0 or more, got {num_workers}")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"unknown device {device!r}: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        self.run_dir = Path(run_dir)
        self.meta: dict[str, Any] = read_model_meta(self.run_dir)
        self.model = load_classifier(self.run_dir).to(dev).eval()
        self.device = dev
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        if rgb_bands is None:
            extra = self.meta.get("extra") or {}
            recorded = extra.get("rgb_bands") if isinstance(extra, dict) else None
            rgb_bands = [int(b) for b in recorded] if recorded else None
        self.rgb_bands = list(rgb_bands) if rgb_bands is not None else None
        self._fast: Any = None  # a prepared forward pass (optimize)

    @property
    def classes(self) -> list[str]:
        """Class names in output order."""
        return list(self.model.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing recorded with the model (applied to every input)."""
        return self.model.preprocessing

    def check_top_k(self, top_k: int) -> int:
        """``top_k`` as an int, or :class:`ConfigError` when it is not in 1..number of classes."""
        k = int(top_k)
        n = len(self.classes)
        if k < 1 or k > n:
            raise ConfigError(f"top-k {k} is not between 1 and the model's {n} classes")
        return k

    def optimize(self, mode: str = "jit") -> str:
        """Prepare a faster forward pass for every later prediction (what a long map of a scene
        wants): :func:`landlens.features.inference.optimize_for_inference` on the CPU (traced,
        frozen, channels-last; checked against eager mode first; a graph that cannot be prepared
        leaves eager mode). Returns the mode in use: ``'jit'`` or ``'eager'``."""
        from landlens.features.inference import prepared_forward

        if mode not in ("jit", "none"):
            raise ConfigError(f"unknown forward-pass mode {mode!r}: jit or none")
        cpu = self.device.type == "cpu"
        self._fast = prepared_forward(self.model, self.preprocessing, mode) if cpu else None
        return "eager" if self._fast is None else "jit"

    @torch.inference_mode()
    def log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, C) of a normalised float batch (B, 3, S, S), on the CPU."""
        if self._fast is not None:
            return self._fast(batch.contiguous(memory_format=torch.channels_last)).float()
        return self.model(batch.to(self.device)).float().cpu()

    def _rank(self, log_probs: torch.Tensor, k: int) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
        probs = log_probs.double().exp().numpy()
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]  # ties: lower class index first
            out.append((tuple(self.classes[j] for j in order), tuple(float(row[j]) for j in order)))
        return out

    def probabilities(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities ``(n, classes)`` float32 of network inputs: ``(S, S, 3)`` uint8
        arrays already resized by :func:`~landlens.models.preprocessing.resize_and_crop`."""
        if not len(arrays):
            return np.zeros((0, len(self.classes)), np.float32)
        batch = normalize_batch(torch.from_numpy(np.stack(arrays)), self.preprocessing)
        return self.log_probs(batch).exp().numpy().astype(np.float32)

    def _predict_arrays(self, arrays: Sequence[np.ndarray], k: int) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
        batch = normalize_batch(torch.from_numpy(np.stack(arrays)), self.preprocessing)
        return self._rank(self.log_probs(batch), k)

    def iter_predictions(self, paths: Sequence[str | os.PathLike[str]], top_k: int = 5) -> Iterator[Prediction]:
        """Predictions of already expanded image files, yielded in order, batch by batch."""
        k = self.check_top_k(top_k)
        files = [Path(p) for p in paths]
        if not files:
            return
        ds = _DecodeDataset(files, self.preprocessing, self.rgb_bands)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False,
                                             num_workers=self.num_workers, collate_fn=_as_list)
        for items in loader:
            good = [(i, arr) for i, arr, err in items if err is None]
            ranked = iter(self._predict_arrays([arr for _, arr in good], k)) if good else iter(())
            for i, arr, err in items:
                if err is not None:
                    yield Prediction(path=str(files[i]), error=err)
                else:
                    labels, probs = next(ranked)
                    yield Prediction(path=str(files[i]), labels=labels, probabilities=probs)

    def predict_paths(self, paths: Sequence[str | os.PathLike[str]], top_k: int = 5) -> list[Prediction]:
        """Top-k predictions of image files and folders (folders scanned recursively).

        Returns one :class:`Prediction` per image, in input order (folder contents in natural
        order); an unreadable image gets a prediction with ``error`` set.

        Raises:
            ConfigError: ``top_k`` outside 1..number of classes.
            DatasetError: an input that does not exist, or a folder with no image file.
        """
        self.check_top_k(top_k)
        return list(self.iter_predictions(expand_inputs(paths), top_k))

    def predict_images(self, images: Sequence[Image.Image], top_k: int = 5) -> list[Prediction]:
        """Top-k predictions of PIL images (converted to RGB, then the same preprocessing)."""
        k = self.check_top_k(top_k)
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            arrays = [to_uint8_array(resize_and_crop(im.convert("RGB"), self.preprocessing)) for im in chunk]
            for labels, probs in self._predict_arrays(arrays, k):
                out.append(Prediction(path=None, labels=labels, probabilities=probs))
        return out




class ZeroShotPredictor:
    """:class:`Predictor`'s interface for zero-shot labels: any class names, scored by an
    image-text alignment (``landlens retrieval align``) through prompt ensembles
    (:mod:`landlens.retrieval.textspace`); the alignment's backbones embed the images."""

    def __init__(self, alignment: str | os.PathLike[str], classes: Sequence[str], *,
                 templates: Sequence[str] | None = None, batch_size: int = 32) -> None:
        from landlens.retrieval.textspace import DEFAULT_TEMPLATES, open_text_space
        from landlens.retrieval.textstudy import AlignedImageTower

        names = [c.strip() for c in classes if c and c.strip()]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError("zero-shot labelling needs at least two distinct class names")
        self.space = open_text_space(alignment)
        self.tower = AlignedImageTower(self.space)
        self._classes = names
        self.templates = tuple(templates or DEFAULT_TEMPLATES)
        self.class_vectors = self.space.class_vectors(names, self.templates)
        self.batch_size = int(batch_size)

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    def check_top_k(self, top_k: int) -> int:
        if isinstance(top_k, bool) or not 1 <= int(top_k) <= len(self._classes):
            raise ConfigError(f"--top-k must be between 1 and {len(self._classes)} (the number of classes), got {top_k}")
        return int(top_k)

    def iter_predictions(self, paths: Sequence[str | os.PathLike[str]], top_k: int = 5) -> Iterator[Prediction]:
        """One :class:`Prediction` per path, in order, batch by batch (unreadable files carry an error)."""
        from landlens.retrieval.textspace import class_probabilities

        k = self.check_top_k(top_k)
        for s in range(0, len(paths), self.batch_size):
            batch = [str(p) for p in paths[s:s + self.batch_size]]
            vecs, errors = self.tower.embed_files(batch)
            probs = class_probabilities(self.space, vecs, self.class_vectors) if len(vecs) else np.zeros((0, 0))
            row = 0
            for i, p in enumerate(batch):
                if i in errors:
                    yield Prediction(p, error=errors[i])
                    continue
                order = np.argsort(-probs[row], kind="stable")[:k]
                yield Prediction(p, tuple(self._classes[j] for j in order), tuple(float(probs[row, j]) for j in order))
                row += 1


__all__ = ["Prediction", "Predictor", "ZeroShotPredictor", "expand_inputs"]
