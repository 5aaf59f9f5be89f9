"""The re-ranker base class, its per-block binding, the aqe+graph pipeline and the specs.

A re-ranker is an estimator in the scikit-learn style: the settings go to ``__init__``,
:meth:`Reranker.fit` learns from the database (attributes ending in ``_``), and then it is

- a distance for :func:`landlens.retrieval.metrics.evaluate_retrieval`: ``r(q_block, db)``
  returns ``(b, n)`` distances (smaller = closer) and checks that ``db`` is the database it
  was fitted on; :meth:`Reranker.bind` gives the per-block form that knows which database
  row each query is (what :func:`landlens.retrieval.evaluate.evaluate` uses);
- a search: :meth:`Reranker.rerank` returns the top-k ``(distances, indices)``.

Each method's module declares its spec keys on its class (``settings``, ``aliases``,
``stage``) and registers it with :func:`register`; :func:`make_reranker` reads a spec such as
``"aqe:n=2,alpha=3"`` or ``"aqe+diffusion"`` against that registry.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from landlens.errors import ConfigError, LandlensError

# ------------------------------------------------------------------------------ helpers


def _as_matrix(x: Any, what: str) -> np.ndarray:
    """Float32, C-contiguous, 2-D numpy copy-free view of ``x`` (numpy array or tensor)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if a.ndim != 2:
        raise LandlensError(f"{what}: expected a 2-D feature matrix, got shape {a.shape}")
    return a


def _unit(a: np.ndarray) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero), float32 tensor."""
    t = torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)  # a read-only memmap is copied
    return torch.nn.functional.normalize(t, dim=1).contiguous()


def _row_digests(a: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in a]


def _matrix_digest(a: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(a.shape).encode())
    h.update(memoryview(a).cast("B"))
    return h.digest()


_STATE_KEYS = ("spec", "database_digest")


def _state_matches(state: dict[str, np.ndarray], spec: str, digest: bytes) -> bool:
    """Whether a :meth:`Reranker.fitted_state` was made with ``spec`` on the database of ``digest``."""
    try:
        return (bytes(np.asarray(state["spec"], dtype=np.uint8)) == spec.encode()
                and bytes(np.asarray(state["database_digest"], dtype=np.uint8)) == digest)
    except (KeyError, TypeError, ValueError):
        return False


def pack_csr(name: str, m: Any) -> dict[str, np.ndarray]:
    """A SciPy CSR matrix as three named arrays (``name.data``, ``.indices``, ``.indptr``) and its shape."""
    return {f"{name}.data": m.data, f"{name}.indices": m.indices, f"{name}.indptr": m.indptr,
            f"{name}.shape": np.asarray(m.shape, dtype=np.int64)}


def unpack_csr(state: dict[str, np.ndarray], name: str) -> Any:
    """The CSR matrix :func:`pack_csr` stored under ``name``."""
    import scipy.sparse as sp

    return sp.csr_matrix((state[f"{name}.data"], state[f"{name}.indices"], state[f"{name}.indptr"]),
                         shape=tuple(int(v) for v in state[f"{name}.shape"]))


# ------------------------------------------------------------------------------ base class


class Reranker:
    """Base of the re-rankers: fitting, database checks, query rows, distances and top-k.

    Subclasses implement ``_fit(x)`` (``x`` the L2-normalised database, a float32 tensor)
    and ``_score(q, rows)`` (``q`` L2-normalised queries, ``rows`` the database row of each
    query or -1) returning ``(b, n)`` float32 distances.

    Attributes set by :meth:`fit`: ``database_`` (the normalised database), ``n_database_``,
    ``fit_seconds_``.
    """

    method: str = ""
    reference: str = ""
    symmetric = False  # not a BaseDistance: evaluation calls it once per query block
    #: spec key -> (``__init__`` argument, int/float/str); two keys may name one argument
    settings: ClassVar[dict[str, tuple[str, type]]] = {}
    #: other names of the method in a spec
    aliases: ClassVar[tuple[str, ...]] = ()
    #: ``"expansion"`` (rewrites the query: first in a combination) or ``"graph"`` (second)
    stage: str = ""
    #: an expansion whose rewrite of a database row's query is that row of its ``searched_``
    #: (the graph stage of a combination then knows the query's own node)
    keeps_rows: ClassVar[bool] = False

    # -------------------------------------------------------------- settings
    def params(self) -> dict[str, Any]:
        """The settings, as in the spec."""
        return {}

    @property
    def spec(self) -> str:
        """The canonical spec (every setting spelled out); :func:`make_reranker` reads it back."""
        p = self.params()
        if not p:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in p.items())

    @property
    def name(self) -> str:
        return self.spec

    def to_dict(self) -> dict[str, Any]:
        """How the re-ranker is recorded in a result file."""
        d: dict[str, Any] = {"spec": self.spec, "method": self.method, "params": self.params(),
                             "base_similarity": "cosine (dot product of L2-normalised features)",
                             "reference": self.reference}
        if hasattr(self, "n_database_"):
            d["database_size"] = self.n_database_
            d["fit_seconds"] = round(self.fit_seconds_, 4)
            d["restored"] = bool(self.restored_)
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    # -------------------------------------------------------------- fitting
    def fit(self, database: np.ndarray | torch.Tensor, *, state: dict[str, np.ndarray] | None = None) -> Reranker:
        """Learn the graph / augmentation from the database features ``(n, D)``.

        ``state``: what :meth:`fitted_state` gave after a fit on the same database with the same
        settings; what it holds is restored instead of learned again (``restored_`` says so).
        A state of another database or other settings is ignored and the re-ranker learns afresh.
        """
        raw = _as_matrix(database, "re-ranking database")
        if raw.shape[0] < 2:
            raise LandlensError(f"re-ranking ({self.spec}) needs a database of at least 2 images, got {raw.shape[0]}")
        if not np.isfinite(raw.sum(dtype=np.float64)):
            raise LandlensError("the re-ranking database has NaN/inf features (unreadable images?)")
        t0 = time.perf_counter()
        self.database_ = _unit(raw)
        self.n_database_ = int(raw.shape[0])
        self.database_shape_ = tuple(raw.shape)
        self.database_digest_ = _matrix_digest(raw)
        self.row_digests_ = _row_digests(raw)
        self._row_of = {}
        for i, dg in enumerate(self.row_digests_):
            self._row_of.setdefault(dg, i)
        self._checked: Any = None
        self.restored_ = state is not None and _state_matches(state, self.spec, self.database_digest_)
        if self.restored_:
            assert state is not None
            self._load(self.database_, {k: v for k, v in state.items() if k not in _STATE_KEYS})
        else:
            self._fit(self.database_)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def fitted_state(self) -> dict[str, np.ndarray]:
        """The learned arrays, for a later :meth:`fit` on the same database to restore instead of
        learning again (empty when nothing learned is worth keeping: the fit is as cheap as a load).

        Besides the method's own arrays it holds the spec and the database's digest, so a state is
        only ever restored for the settings and the database it was learned on.
        """
        self._require_fit()
        own = self._state()
        if not own:
            return {}
        own = {k: np.ascontiguousarray(v) for k, v in own.items()}  # savers write the buffer as it lies
        return {**own, "spec": np.frombuffer(self.spec.encode(), dtype=np.uint8).copy(),
                "database_digest": np.frombuffer(self.database_digest_, dtype=np.uint8).copy()}

    def _fit(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:
        """What :meth:`_load` needs to skip the learning (default: nothing, always learned)."""
        return {}

    def _load(self, x: torch.Tensor, state: dict[str, np.ndarray]) -> None:
        """Set the fitted attributes from :meth:`_state`'s arrays (``x`` the normalised database)."""
        self._fit(x)

    def _score(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _require_fit(self) -> None:
        if not hasattr(self, "database_"):
            raise LandlensError(f"re-ranker {self.spec} is used before fit(database)")

    # -------------------------------------------------------------- queries
    def query_rows(self, queries: np.ndarray | torch.Tensor) -> np.ndarray:
        """The database row of each query whose features are byte-identical to one (else -1).

        Of identical database rows, the first is reported.
        """
        self._require_fit()
        a = _as_matrix(queries, "queries")
        return np.array([self._row_of.get(d, -1) for d in _row_digests(a)], dtype=np.int64)

    def _rows(self, raw: np.ndarray, query_rows: Any) -> np.ndarray:
        if isinstance(query_rows, str):
            if query_rows != "auto":
                raise ValueError(f"query_rows must be 'auto', None or row indices, got {query_rows!r}")
            return np.array([self._row_of.get(d, -1) for d in _row_digests(raw)], dtype=np.int64)
        if query_rows is None:
            return np.full(raw.shape[0], -1, dtype=np.int64)
        rows = np.asarray(query_rows, dtype=np.int64).reshape(-1)
        if rows.shape[0] != raw.shape[0] or bool((rows >= self.n_database_).any()):
            raise ValueError(f"query_rows needs one database row (or -1) per query: {rows.shape[0]} rows for "
                             f"{raw.shape[0]} queries, database of {self.n_database_}")
        return rows

    def distances(self, queries: np.ndarray | torch.Tensor, query_rows: Any = "auto") -> torch.Tensor:
        """Re-ranked distances ``(b, n)`` of the queries to every database item (smaller = closer).

        ``query_rows``: ``"auto"`` (a query byte-identical to a database row is that row),
        ``None`` (queries are outside the database) or one row index (-1: none) per query.
        """
        self._require_fit()
        raw = _as_matrix(queries, "queries")
        if raw.shape[1] != self.database_shape_[1]:
            raise LandlensError(f"queries have {raw.shape[1]} dimensions, the re-ranking database "
                                f"{self.database_shape_[1]}")
        rows = self._rows(raw, query_rows)
        with torch.no_grad():
            return self._score(_unit(raw), rows)

    def _check_database(self, db: Any) -> None:
        ref = self._checked() if self._checked is not None else None
        if ref is not None and ref is db:
            return
        a = _as_matrix(db, "database")
        if tuple(a.shape) != self.database_shape_ or _matrix_digest(a) != self.database_digest_:
            raise LandlensError(f"re-ranker {self.spec} was fitted on a database of shape {self.database_shape_}; "
                                f"it is asked to rank another one of shape {tuple(a.shape)}: fit it on that one")
        try:
            self._checked = weakref.ref(db)
        except TypeError:
            self._checked = None

    def __call__(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        """Distances ``(b, n)`` as a :class:`~landlens.retrieval.distances.Distance`.

        ``db`` must be the fitted database (checked by content once per object); query rows
        are found automatically (see :meth:`distances`).
        """
        self._require_fit()
        self._check_database(db)
        return self.distances(q, "auto")

    def rerank(self, queries: np.ndarray | torch.Tensor, k: int, query_rows: Any = "auto",
               exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best database items per query: ``(distances, indices)``, both ``(b, k)``.

        Ordered by distance, ties by database index. ``exclude_self`` leaves out the query's
        own database row (found as in :meth:`distances`).
        """
        self._require_fit()
        raw = _as_matrix(queries, "queries")
        rows = self._rows(raw, query_rows)
        d = self.distances(raw, rows)
        if exclude_self:
            has = np.flatnonzero(rows >= 0)
            d[torch.from_numpy(has), torch.from_numpy(rows[has])] = float("inf")
        k = max(0, min(int(k), self.n_database_ - (1 if exclude_self and (rows >= 0).any() else 0)))
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        return torch.gather(d, 1, order).numpy(), order.numpy().astype(np.int64)

    def bind(self, query_rows: Sequence[int] | np.ndarray) -> BoundReranker:
        """A distance for :func:`~landlens.retrieval.metrics.evaluate_retrieval` over queries
        whose database rows are known (``-1``: not in the database), called block after block
        in query order; it also times the re-ranking."""
        self._require_fit()
        return BoundReranker(self, np.asarray(query_rows, dtype=np.int64).reshape(-1))


class BoundReranker:
    """A fitted re-ranker used block by block over a known sequence of queries.

    ``evaluate_retrieval`` ranks query blocks in order; each call takes the next rows of
    ``query_rows`` and checks (by feature bytes) that the block holds those database rows.
    ``seconds`` and ``queries`` accumulate the time spent re-ranking.
    """

    symmetric = False

    def __init__(self, reranker: Reranker, query_rows: np.ndarray) -> None:
        self.reranker = reranker
        self.query_rows = query_rows
        self.position = 0
        self.seconds = 0.0
        self.queries = 0

    @property
    def name(self) -> str:
        return self.reranker.spec

    def to_dict(self) -> dict[str, Any]:
        return self.reranker.to_dict()

    def __call__(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        r = self.reranker
        r._check_database(db)
        raw = _as_matrix(q, "queries")
        s, e = self.position, self.position + raw.shape[0]
        if e > self.query_rows.shape[0]:
            raise RuntimeError(f"bound re-ranker called for queries {s}..{e} of {self.query_rows.shape[0]}")
        rows = self.query_rows[s:e]
        digests = _row_digests(raw)
        for i in np.flatnonzero(rows >= 0):
            if digests[i] != r.row_digests_[rows[i]]:
                raise RuntimeError(f"query {s + i} is not database row {rows[i]}: blocks out of order")
        self.position = e
        out = r.distances(raw, rows)
        self.seconds += time.perf_counter() - t0
        self.queries += raw.shape[0]
        return out


# ------------------------------------------------------------------------------ pipeline


class RerankPipeline(Reranker):
    """An expansion (alpha-QE, optionally with alpha-DBA; or cluster projections) followed by a
    graph re-ranker.

    The graph method (diffusion or k-reciprocal) is fitted on the database the expansion
    searches (augmented with ``dba``, or extended by ``clusterlda``) and ranks for the expanded
    queries, which are treated as queries from outside the database unless the expansion
    ``keeps_rows`` (a database row's rewrite is its row of ``searched_``). ``expansion`` is a
    re-ranker of stage ``"expansion"`` (it has ``expand`` and ``searched_``: :class:`AlphaQE`,
    :class:`ClusterLDA`), ``graph`` one of stage ``"graph"``.
    """

    method = "pipeline"

    def __init__(self, expansion: Reranker, graph: Reranker) -> None:
        if getattr(expansion, "stage", "") != "expansion" or getattr(graph, "stage", "") != "graph":
            raise ConfigError(f"a re-ranking combination is {' or '.join(_of_stage('expansion'))} followed by "
                              f"{' or '.join(_of_stage('graph'))}")
        self.expansion = expansion
        self.graph = graph

    @property
    def spec(self) -> str:
        return f"{self.expansion.spec}+{self.graph.spec}"

    @property
    def reference(self) -> str:  # type: ignore[override]
        return f"{self.expansion.reference}; {self.graph.reference}"

    def params(self) -> dict[str, Any]:
        return {self.expansion.method: self.expansion.params(), self.graph.method: self.graph.params()}

    def _fit(self, x: torch.Tensor) -> None:
        self.expansion._fit(x)
        self.searched_ = self.expansion.searched_  # type: ignore[attr-defined]
        self.graph._fit(self.searched_)

    def _state(self) -> dict[str, np.ndarray]:
        return {f"{part}.{k}": v for part, stage in (("expansion", self.expansion), ("graph", self.graph))
                for k, v in stage._state().items()}

    def _load(self, x: torch.Tensor, state: dict[str, np.ndarray]) -> None:
        def part(name: str) -> dict[str, np.ndarray]:
            return {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}

        def load(stage: Reranker, sub: dict[str, np.ndarray], db: torch.Tensor) -> None:
            if sub:
                stage._load(db, sub)
            else:  # a stage that keeps nothing (its fit is as cheap as a load)
                stage._fit(db)

        load(self.expansion, part("expansion"), x)
        self.searched_ = self.expansion.searched_  # type: ignore[attr-defined]
        load(self.graph, part("graph"), self.searched_)

    def _score(self, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        qe = self.expansion.expand(q, rows)  # type: ignore[attr-defined]
        own = rows if self.expansion.keeps_rows else np.full(qe.shape[0], -1, dtype=np.int64)
        return self.graph._score(qe, own)


# ------------------------------------------------------------------------------ specs


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


#: The registered re-rankers by spec name, in registration order (aqe, diffusion, kreciprocal).
METHODS: dict[str, type[Reranker]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Reranker]) -> type[Reranker]:
    """Class decorator: make a :class:`Reranker` subclass available to :func:`make_reranker`
    under its ``method`` and ``aliases``."""
    if not cls.method or cls.stage not in ("expansion", "graph"):
        raise TypeError(f"{cls.__name__} needs a method name and a stage ('expansion' or 'graph')")
    METHODS[cls.method] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.method
    return cls


def _of_stage(stage: str) -> list[str]:
    return [name for name, cls in METHODS.items() if cls.stage == stage]


def _visible_keys(settings: dict[str, tuple[str, type]]) -> list[str]:
    """The spec keys to list in messages: the first key of each argument (``lambda``, not ``lam``)."""
    seen: set[str] = set()
    out = []
    for key, (arg, _) in settings.items():
        if arg not in seen:
            seen.add(arg)
            out.append(key)
    return out

_STAGE = re.compile(r"^(?P<name>[a-z][a-z0-9_-]*)(?::(?P<opts>.*))?$")

SPEC_HELP = ("aqe[:n=2,alpha=3,dba=0] | clusterlda[:kmin=24,kmax=96,steps=5,weight=1,dim=256,seed=0] "
             "| diffusion[:k=50,kq=10,gamma=3,alpha=0.99,iters=20,tol=1e-6,graph=mutual] "
             "| kreciprocal[:k1=20,k2=6,lambda=0.3] | aqe+diffusion | aqe+kreciprocal | clusterlda+kreciprocal")


def _stage(text: str, spec: str) -> Reranker:
    m = _STAGE.match(text)
    if not m:
        raise ConfigError(f"re-ranking spec {spec!r}: cannot read {text!r}; expected e.g. {SPEC_HELP}")
    name = _ALIASES.get(m.group("name"), m.group("name"))
    if name not in METHODS:
        raise ConfigError(f"re-ranking spec {spec!r}: unknown method {m.group('name')!r}; "
                          f"available: {', '.join(METHODS)}")
    cls = METHODS[name]
    keys = cls.settings
    kwargs: dict[str, Any] = {}
    opts = m.group("opts")
    if opts is not None:
        for item in opts.split(","):
            if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
                raise ConfigError(f"re-ranking spec {spec!r}: {item!r} is not key=value ({name} keys: "
                                  f"{', '.join(_visible_keys(keys))})")
            key, value = item.split("=", 1)
            if key not in keys:
                raise ConfigError(f"re-ranking spec {spec!r}: unknown {name} setting {key!r}; "
                                  f"known: {', '.join(_visible_keys(keys))}")
            arg, kind = keys[key]
            if arg in kwargs:
                raise ConfigError(f"re-ranking spec {spec!r}: {name} setting {key!r} given twice")
            try:
                if kind is int:
                    f = float(value)
                    if not f.is_integer():
                        raise ValueError
                    kwargs[arg] = int(f)
                elif kind is float:
                    f = float(value)
                    if not math.isfinite(f):
                        raise ValueError
                    kwargs[arg] = f
                else:
                    kwargs[arg] = value
            except ValueError:
                raise ConfigError(f"re-ranking spec {spec!r}: {name} {key}={value!r} is not "
                                  f"{'an integer' if kind is int else 'a number'}") from None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"re-ranking spec {spec!r}: {exc}") from None


def make_reranker(spec: str) -> Reranker:
    """A re-ranker from a spec (see :mod:`landlens.retrieval.rerank` and :data:`SPEC_HELP`).

    ``"aqe"``, ``"diffusion"``, ``"kreciprocal"``, each optionally followed by
    ``:key=value,...``; ``"aqe+diffusion"`` / ``"aqe+kreciprocal"`` chain query expansion and
    a graph method. Unknown methods or keys, malformed values and other combinations raise
    :class:`~landlens.errors.ConfigError` with one line.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"re-ranking spec {spec!r} is empty; expected e.g. {SPEC_HELP}")
    text = spec.strip().lower().replace(" ", "")
    parts = text.split("+")
    if any(not p for p in parts):
        raise ConfigError(f"re-ranking spec {spec!r}: empty part around '+'")
    stages = [_stage(p, spec) for p in parts]
    if len(stages) == 1:
        return stages[0]
    if len(stages) == 2 and stages[0].stage == "expansion" and stages[1].stage == "graph":
        return RerankPipeline(stages[0], stages[1])
    raise ConfigError(f"re-ranking spec {spec!r}: a combination is {' or '.join(_of_stage('expansion'))} followed "
                      f"by one of {', '.join(_of_stage('graph'))} (e.g. 'aqe+diffusion')")


__all__ = ["METHODS", "SPEC_HELP", "BoundReranker", "RerankPipeline", "Reranker", "make_reranker", "register"]
