"""Retrieval evaluation protocols: which images query, and which images each query searches.

A protocol resolves, for one feature set, to the rows used as queries, the rows of the
database, and for each query the database row it must leave out (itself). An image is
relevant to a query when it has the query's class.

``archive``
    Every image queries all the other images of the collection (the query itself excluded).
    This is the protocol of most remote-sensing CBIR papers on UC Merced, PatternNet, AID...

``split``
    The ``test`` part of a :class:`~landlens.data.splits.SplitManifest` queries, and the user
    chooses the database:

    - ``archive-minus-query``: the whole archive (every part of the split) except the query;
    - ``test``: the test part only, except the query.

Manifest paths are checked against the feature set: a path of the split that has no feature
row is an error, unless the feature store recorded that image as unreadable (it is then left
out and listed in :attr:`Protocol.dropped`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from landlens.data.splits import SplitManifest
from landlens.errors import DatasetError, LandlensError
from landlens.features.store import FeatureSet

PROTOCOLS = ("archive", "split")
DATABASES = ("archive-minus-query", "test")
ProtocolName = Literal["archive", "split"]
DatabaseName = Literal["archive-minus-query", "test"]

_MAX_LISTED = 3


@dataclass
class Protocol:
    """A resolved protocol: query rows, database rows and the row each query leaves out.

    Attributes:
        name: ``archive`` or ``split``.
        database: ``archive-minus-query`` or ``test``.
        query_indices: rows of the feature set that query, in evaluation order.
        database_indices: rows of the feature set that form the database.
        exclude: per query, the position in ``database_indices`` of the query itself (``-1``
            when it is not in the database).
        part: the split part that queries (``split`` only).
        dropped: split paths left out because their images were recorded as unreadable.
    """

    name: str
    database: str
    query_indices: np.ndarray
    database_indices: np.ndarray
    exclude: np.ndarray
    part: str | None = None
    dropped: list[str] = field(default_factory=list)

    @property
    def n_queries(self) -> int:
        return int(self.query_indices.shape[0])

    @property
    def n_database(self) -> int:
        return int(self.database_indices.shape[0])

    @property
    def queries_are_database(self) -> bool:
        """Queries and database are the same rows in the same order (each excludes itself)."""
        return (self.n_queries == self.n_database and np.array_equal(self.query_indices, self.database_indices)
                and np.array_equal(self.exclude, np.arange(self.n_queries)))

    def describe(self) -> str:
        """One line for humans."""
        if self.name == "archive":
            return f"archive: each of {self.n_queries} images queries the other {self.n_database - 1}"
        where = "the whole archive" if self.database == "archive-minus-query" else f"the {self.part} part"
        return (f"split: {self.n_queries} {self.part} images query {where} "
                f"({self.n_database} images, the query itself excluded)")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "queries": "every image" if self.name == "archive" else f"split part {self.part!r}",
            "database": self.database,
            "self_excluded": True,
            "relevance": "same class",
            "n_queries": self.n_queries,
            "n_database": self.n_database,
            "n_database_per_query": self.n_database - int(bool((self.exclude >= 0).any())),
        }
        if self.dropped:
            d["dropped_unreadable"] = list(self.dropped)
        return d


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def feature_set_name(features: FeatureSet) -> str:
    """A short name of a feature set for messages: ``dataset/backbone[+backbone...]``."""
    meta = features.meta or {}
    dataset = (meta.get("dataset") or {}).get("name") or (meta.get("dataset") or {}).get("root") or "features"
    fusion = meta.get("fusion") or {}
    sources = [s.get("backbone") for s in fusion.get("sources", []) if s.get("backbone")]
    backbone = "+".join(sources) if sources else (meta.get("identity") or {}).get("backbone")
    return f"{dataset}/{backbone}" if backbone else str(dataset)


def archive_protocol(n: int) -> Protocol:
    """Every one of ``n`` images queries the other ``n - 1``."""
    idx = np.arange(n, dtype=np.int64)
    return Protocol("archive", "archive-minus-query", idx, idx.copy(), idx.copy())


def split_protocol(features: FeatureSet, manifest: SplitManifest, database: DatabaseName = "archive-minus-query",
                   part: str = "test") -> Protocol:
    """Queries: the ``part`` images of ``manifest``; database: the archive or that part, minus the query.

    Raises :class:`DatasetError` when the manifest and the feature set do not describe the same
    images (a split path without a feature row that is not a known unreadable image, or a path
    whose class differs).
    """
    if database not in DATABASES:
        raise LandlensError(f"unknown database {database!r}: choose one of {', '.join(DATABASES)}")
    name = feature_set_name(features)
    part_paths, part_labels = manifest.part(part)
    position = {str(p): i for i, p in enumerate(features.paths)}
    unreadable = {str(f.get("path")) for f in (features.meta or {}).get("failures", []) if isinstance(f, dict)}
    all_split = [p for items in manifest.parts.values() for p, _ in items]
    if not all_split:
        raise DatasetError("the split manifest lists no image")
    missing = [p for p in all_split if p not in position]
    unexplained = [p for p in missing if p not in unreadable]
    if unexplained:
        raise DatasetError(
            f"{len(unexplained)} file(s) of the split are not in the feature set {name} "
            f"({len(features)} images): {_listing(unexplained)}; was the split made for another folder?"
        )
    mismatched = []
    for p, label in zip(part_paths, part_labels):
        i = position.get(p)
        if i is None:
            continue
        mine = features.classes[int(features.labels[i])] if int(features.labels[i]) < len(features.classes) else None
        theirs = manifest.classes[int(label)]
        if mine != theirs:
            mismatched.append(f"{p} ({theirs} in the split, {mine} in the features)")
    if mismatched:
        raise DatasetError(f"{len(mismatched)} file(s) have another class in the split than in the feature set "
                           f"{name}: {_listing(mismatched)}")
    queries = np.array([position[p] for p in part_paths if p in position], dtype=np.int64)
    if database == "archive-minus-query":
        db = np.arange(len(features), dtype=np.int64)
        exclude = queries.copy()
    else:
        db = queries.copy()
        exclude = np.arange(len(queries), dtype=np.int64)
    return Protocol("split", database, queries, db, exclude, part=part, dropped=sorted(set(missing)))


def resolve_protocol(features: FeatureSet, protocol: str = "archive", *, manifest: SplitManifest | None = None,
                     database: str = "archive-minus-query", part: str = "test") -> Protocol:
    """The :class:`Protocol` named ``protocol`` for ``features`` (see the module docstring).

    Raises :class:`LandlensError` for an unknown name, a ``split`` without manifest, a
    ``test`` database with the ``archive`` protocol, or a protocol with no query or an
    empty database.
    """
    if protocol not in PROTOCOLS:
        raise LandlensError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if database not in DATABASES:
        raise LandlensError(f"unknown database {database!r}: choose one of {', '.join(DATABASES)}")
    if protocol == "archive":
        if database != "archive-minus-query":
            raise LandlensError(f"database {database!r} needs the split protocol (--protocol split --split FILE)")
        if manifest is not None:
            raise LandlensError("a split manifest was given with the archive protocol; use --protocol split")
        p = archive_protocol(len(features))
    else:
        if manifest is None:
            raise LandlensError("the split protocol needs a split manifest (--split FILE, see `landlens data split`)")
        p = split_protocol(features, manifest, database, part)  # type: ignore[arg-type]
    if p.n_queries == 0:
        raise LandlensError(f"{p.name} protocol on {feature_set_name(features)}: no query images")
    if p.n_database - int(bool((p.exclude >= 0).any())) <= 0:
        raise LandlensError(f"{p.name} protocol on {feature_set_name(features)}: the database is empty "
                            f"once each query leaves itself out ({p.n_database} image(s))")
    return p


__all__ = ["DATABASES", "PROTOCOLS", "Protocol", "archive_protocol", "feature_set_name", "resolve_protocol",
           "split_protocol"]
