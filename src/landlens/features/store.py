"""The feature store: features of one image collection under one extractor, on disk.

A store is a folder::

    STORE/
      meta.json          what made it: backbone, weights identity, preprocessing, dataset,
                         item digest, status ('partial' or 'complete'), failures
      items.json         relative paths and labels, in extraction order
      chunks/NNNNNN.npz  features of items [i*chunk, (i+1)*chunk) while extraction runs
      features.npy       (N, D) float32 once complete (rows of unreadable images are NaN)
      valid.npy          (N,) bool: which rows hold features

Every file is written aside and renamed into place, so an interrupted run leaves only whole
chunks; a rerun with the same extractor and items resumes after the last whole chunk, and a
rerun with anything different is refused instead of mixing features.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from landlens.atomic import atomic_file, atomic_write_bytes, atomic_write_json
from landlens.errors import FeatureStoreError

FORMAT_VERSION = 1
META = "meta.json"
ITEMS = "items.json"


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, arr)


def items_digest(paths: Sequence[str], labels: Sequence[int]) -> str:
    """sha256 of the (path, label) list in order: the identity of what is extracted."""
    h = hashlib.sha256()
    for p, y in zip(paths, labels):
        h.update(f"{p}\t{int(y)}\n".encode())
    return h.hexdigest()


@dataclass
class FeatureSet:
    """Features of a complete store, rows aligned with ``paths`` and ``labels``."""

    features: np.ndarray
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    meta: dict[str, Any]
    valid: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.paths)

    def only_valid(self) -> "FeatureSet":
        """Drop the rows of images that could not be read."""
        if self.valid.all():
            return self
        idx = np.flatnonzero(self.valid)
        return FeatureSet(self.features[idx], [self.paths[i] for i in idx], self.labels[idx],
                          self.classes, self.meta, self.valid[idx])


def features_identity(meta: dict[str, Any] | None, dim: int) -> dict[str, Any]:
    """What identifies features for a model trained on them (a matching discriminator, an image-text
    alignment): the extractor's backbone, weights digest and preprocessing, the fusion recipe
    and its sources when fused, and the vector length. Recorded with the model and compared key
    by key with the features it is later given."""
    meta = meta or {}
    ident = meta.get("identity") or {}
    out: dict[str, Any] = {}
    fusion = meta.get("fusion")
    if fusion:
        out["fusion"] = {k: v for k, v in fusion.items() if k != "fit_rows"}
    for key in ("backbone", "weights_digest", "preprocessing"):
        if ident.get(key) is not None:
            out[key] = ident[key]
    out["dim"] = int(dim)
    return out


class FeatureStore:
    """Create, resume and read a feature store folder (see module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ reading
    @property
    def meta_path(self) -> Path:
        return self.root / META

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise FeatureStoreError(f"no feature store at {self.root} (missing {META})") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise FeatureStoreError(f"feature store {self.root} has an unreadable {META}: {exc}") from None

    def read_items(self) -> tuple[list[str], np.ndarray]:
        try:
            d = json.loads((self.root / ITEMS).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FeatureStoreError(f"feature store {self.root} has an unreadable {ITEMS}: {exc}") from None
        return list(d["paths"]), np.asarray(d["labels"], dtype=np.int64)

    def load(self, *, mmap: bool = False) -> FeatureSet:
        """Read a complete store."""
        meta = self.read_meta()
        if meta.get("format") != FORMAT_VERSION:
            raise FeatureStoreError(f"feature store {self.root} has format {meta.get('format')}, expected {FORMAT_VERSION}")
        if meta.get("status") != "complete":
            done = len(self.completed_chunks())
            raise FeatureStoreError(
                f"feature store {self.root} is incomplete ({done} of {meta.get('n_chunks')} chunks); "
                f"rerun the same `landlens features extract` command to resume"
            )
        paths, labels = self.read_items()
        try:
            feats = np.load(self.root / "features.npy", mmap_mode="r" if mmap else None)
            valid = np.load(self.root / "valid.npy")
        except (OSError, ValueError) as exc:
            raise FeatureStoreError(f"feature store {self.root}: cannot read features: {exc}") from None
        if feats.shape[0] != len(paths) or valid.shape[0] != len(paths):
            raise FeatureStoreError(f"feature store {self.root}: {feats.shape[0]} feature rows for {len(paths)} items")
        return FeatureSet(feats, paths, labels, list(meta["dataset"]["classes"]), meta, valid)

    # ------------------------------------------------------------------ writing
    def completed_chunks(self) -> set[int]:
        d = self.root / "chunks"
        if not d.is_dir():
            return set()
        return {int(p.stem) for p in d.glob("*.npz") if p.stem.isdigit()}

    def begin(self, identity: dict[str, Any], dataset: dict[str, Any], paths: Sequence[str],
              labels: Sequence[int], chunk_size: int, *, overwrite: bool = False,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a new store or reopen a matching partial one. Returns the meta.

        ``identity`` is everything that determines the features (extractor, weights,
        preprocessing); it must equal the stored one to resume.
        """
        digest = items_digest(paths, labels)
        n_chunks = max(1, -(-len(paths) // chunk_size))
        if self.exists():
            if overwrite:
                self.remove()
            else:
                old = self.read_meta()
                self._check_same(old, identity, digest, chunk_size)
                return old
        elif self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FeatureStoreError(f"{self.root} exists and is not a feature store; choose another --out")
            shutil.rmtree(self.root)
        meta = {
            "format": FORMAT_VERSION,
            "status": "partial",
            "identity": identity,
            "dataset": {**dataset, "n_items": len(paths), "items_sha256": digest},
            "chunk_size": int(chunk_size),
            "n_chunks": n_chunks,
            "failures": [],
            **(extra or {}),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / ITEMS, {"paths": list(paths), "labels": [int(y) for y in labels]})
        atomic_write_json(self.meta_path, meta)
        return meta

    def _check_same(self, old: dict[str, Any], identity: dict[str, Any], digest: str, chunk_size: int) -> None:
        if old.get("format") != FORMAT_VERSION:
            raise FeatureStoreError(f"{self.root} holds a feature store of another format; use --overwrite or a new --out")
        old_id = old.get("identity", {})
        for key in sorted(set(old_id) | set(identity)):
            if old_id.get(key) != identity.get(key):
                raise FeatureStoreError(
                    f"{self.root} was extracted with a different {key} "
                    f"({_short(old_id.get(key))} vs {_short(identity.get(key))}); refusing to mix features: "
                    f"use a new --out, or --overwrite to replace it"
                )
        if old["dataset"].get("items_sha256") != digest:
            raise FeatureStoreError(
                f"{self.root} was extracted from a different list of images "
                f"({old['dataset'].get('n_items')} items); use a new --out, or --overwrite to replace it"
            )
        if int(old.get("chunk_size", -1)) != int(chunk_size):
            raise FeatureStoreError(
                f"{self.root} was written in chunks of {old.get('chunk_size')}, not {chunk_size}; "
                f"rerun with --chunk-size {old.get('chunk_size')} to resume"
            )

    def write_chunk(self, index: int, features: np.ndarray, valid: np.ndarray, failures: Iterable[dict]) -> None:
        """Persist one whole chunk (atomic)."""
        buf = io.BytesIO()
        np.savez(buf, features=features.astype(np.float32, copy=False), valid=valid.astype(bool),
                 failures=np.asarray(json.dumps(list(failures))))
        atomic_write_bytes(self.root / "chunks" / f"{index:06d}.npz", buf.getvalue())

    def finalize(self, meta: dict[str, Any], dim: int) -> dict[str, Any]:
        """Concatenate the chunks into ``features.npy``, mark complete, drop the chunks."""
        n = int(meta["dataset"]["n_items"])
        cs = int(meta["chunk_size"])
        feats = np.full((n, dim), np.nan, dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        failures: list[dict] = []
        for i in range(int(meta["n_chunks"])):
            path = self.root / "chunks" / f"{i:06d}.npz"
            try:
                with np.load(path) as z:
                    f, v = z["features"], z["valid"]
                    failures.extend(json.loads(str(z["failures"])))
            except (OSError, ValueError, KeyError) as exc:
                raise FeatureStoreError(f"feature store chunk {path} is unreadable: {exc}") from None
            feats[i * cs: i * cs + len(f)] = f
            valid[i * cs: i * cs + len(v)] = v
        _atomic_save_npy(self.root / "features.npy", feats)
        _atomic_save_npy(self.root / "valid.npy", valid)
        meta = {**meta, "status": "complete", "failures": failures, "num_features": int(dim)}
        atomic_write_json(self.meta_path, meta)
        shutil.rmtree(self.root / "chunks", ignore_errors=True)
        return meta

    def update_meta(self, **changes: Any) -> dict[str, Any]:
        meta = {**self.read_meta(), **changes}
        atomic_write_json(self.meta_path, meta)
        return meta

    def remove(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)


class ChunkAssembler:
    """A store's chunks put together from rows that arrive in any order, some maybe twice (a
    retried batch): each chunk is written (atomically, its failures in image order) as soon as
    all its rows are in, and exactly once. Both extraction engines write through it."""

    def __init__(self, store: FeatureStore, n: int, chunk_size: int, dim: int) -> None:
        self.store, self.n, self.chunk_size, self.dim = store, int(n), int(chunk_size), int(dim)
        self.written = set(store.completed_chunks())
        self.open: dict[int, dict[str, Any]] = {}

    def add(self, i: int, features: np.ndarray | None, failure: dict[str, Any] | None = None) -> bool:
        """Row ``i``: its features, or ``None`` with its ``failure`` (``{"path", "reason"}``).
        Returns ``False`` for a row already in (nothing changes)."""
        c, off = divmod(int(i), self.chunk_size)
        if c in self.written:
            return False
        b = self.open.get(c)
        if b is None:
            length = min(self.n, (c + 1) * self.chunk_size) - c * self.chunk_size
            b = self.open[c] = {"f": np.full((length, self.dim), np.nan, np.float32), "v": np.zeros(length, bool),
                                "fail": [], "seen": set()}
        if off in b["seen"]:
            return False
        b["seen"].add(off)
        if features is not None:
            b["f"][off] = features
            b["v"][off] = True
        else:
            b["fail"].append((off, failure))
        if len(b["seen"]) == len(b["v"]):
            self.store.write_chunk(c, b["f"], b["v"], [d for _, d in sorted(b["fail"], key=lambda t: t[0])])
            self.written.add(c)
            del self.open[c]
        return True


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


__all__ = ["ChunkAssembler", "FeatureSet", "FeatureStore", "features_identity", "items_digest"]
