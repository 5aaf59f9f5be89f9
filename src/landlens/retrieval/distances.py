"""Distances between feature vectors for retrieval: smaller means more similar.

A distance is any object with a ``name`` and ``__call__(q, db) -> (nq, ndb)`` tensor (the
:class:`Distance` protocol). The built-in ones derive from :class:`BaseDistance`:

============  ==========================================================================
name          definition, for rows ``x`` of ``q`` and ``y`` of ``db``
============  ==========================================================================
euclidean     ``||x - y||_2``, computed as ``sqrt(max(0, |x|^2 + |y|^2 - 2 x.y))`` with a
              matrix product (float32 inputs stay float32)
cosine        ``1 - x.y / (|x| |y|)``; a zero vector has cosine 0 to everything (distance 1)
manhattan     ``sum |x - y|`` (L1, alias ``l1``)
chi2          ``0.5 * sum (x - y)^2 / (x + y)`` with ``0/0 = 0``, for non-negative features
              (histogram-like, e.g. post-ReLU CNN features); alias ``chi-square``
============  ==========================================================================

The chi-square distance follows the usual histogram form (Puzicha, Hofmann and Buhmann,
"Non-parametric similarity measures for unsupervised texture segmentation and image
retrieval", CVPR 1997), as used for CNN-feature retrieval in remote sensing.

Other distances (for instance the learned matching metric) join the registry with
:func:`register_distance` and are then available by name through :func:`get_distance`
everywhere a distance is accepted.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from landlens.errors import LandlensError

__all__ = [
    "BaseDistance",
    "CallableDistance",
    "ChiSquare",
    "Cosine",
    "Distance",
    "Euclidean",
    "Manhattan",
    "available_distances",
    "distance_name",
    "get_distance",
    "pairwise_distances",
    "register_distance",
]

#: Elements of the (rows x columns x dims) temporary that block-wise distances may hold at once.
BLOCK_ELEMENTS = 1 << 22


@runtime_checkable
class Distance(Protocol):
    """What retrieval needs from a distance: a name and a batched ``(q, db) -> (nq, ndb)`` call.

    Smaller values mean more similar. ``q`` is ``(nq, D)`` and ``db`` is ``(ndb, D)``, both on
    the same device and of the same floating dtype.
    """

    name: str

    def __call__(self, q: torch.Tensor, db: torch.Tensor) -> torch.Tensor: ...


class BaseDistance:
    """Base class of the built-in distances.

    Subclasses implement :meth:`compute` on *prepared* inputs; :meth:`prepare` maps raw
    features to what :meth:`compute` needs (for instance unit vectors for the cosine), so a
    caller that ranks many query blocks against one database prepares it once.

    Attributes:
        name: the registry name.
        symmetric: ``d(x, y) == d(y, x)``; lets evaluation reuse a block's transpose.
    """

    name: str = ""
    symmetric: bool = True

    def __call__(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        q, db = _check_pair(q, db)
        return self.compute(self.prepare(q), self.prepare(db), out=out)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Features as :meth:`compute` takes them (default: unchanged)."""
        return x

    def compute(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(nq, ndb)`` distances of prepared 2-D inputs, written into ``out`` when given."""
        raise NotImplementedError

    def check(self, features: np.ndarray | torch.Tensor, what: str = "features") -> None:
        """Raise :class:`LandlensError` naming ``what`` if ``features`` cannot be used with this distance."""

    def to_dict(self) -> dict[str, Any]:
        """How this distance is recorded in a result file."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _into(out: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value
    out.copy_(value)
    return out


def _check_pair(q: torch.Tensor, db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.ndim != 2 or db.ndim != 2:
        raise ValueError(f"distances need 2-D inputs, got shapes {tuple(q.shape)} and {tuple(db.shape)}")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"feature dimensions differ: {q.shape[1]} (queries) vs {db.shape[1]} (database)")
    if not q.is_floating_point():
        q = q.float()
    if db.dtype != q.dtype:
        db = db.to(q.dtype)
    return q, db


class Euclidean(BaseDistance):
    """L2 distance through one matrix product (the expansion ``|x|^2 + |y|^2 - 2 x.y``)."""

    name = "euclidean"

    def compute(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        qq = torch.linalg.vecdot(q, q, dim=1)[:, None]  # sums of squares, no (n, D) temporary
        dd = torch.linalg.vecdot(db, db, dim=1)[None, :]
        if out is None:
            out = torch.addmm(dd, q, db.T, alpha=-2.0)
        else:
            torch.addmm(dd, q, db.T, alpha=-2.0, out=out)
        return out.add_(qq).clamp_(min=0.0).sqrt_()


class Cosine(BaseDistance):
    """``1 - cosine similarity``: 0 for parallel vectors, 1 for orthogonal ones, 2 for opposite ones."""

    name = "cosine"

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=1)

    def compute(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        one = torch.ones((), dtype=q.dtype, device=q.device)
        if out is None:
            return torch.addmm(one, q, db.T, alpha=-1.0)
        return torch.addmm(one, q, db.T, alpha=-1.0, out=out)


class Manhattan(BaseDistance):
    """L1 (city-block) distance."""

    name = "manhattan"

    def compute(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _into(out, torch.cdist(q, db, p=1))


class ChiSquare(BaseDistance):
    """Chi-square distance of non-negative vectors, ``0.5 * sum_i (x_i - y_i)^2 / (x_i + y_i)``.

    Terms with ``x_i + y_i = 0`` (hence ``x_i = y_i = 0``) count 0. Computed over tiles of
    queries x database rows so that the temporary stays under :data:`BLOCK_ELEMENTS` elements
    whatever the sizes. Negative inputs raise :class:`LandlensError`.
    """

    name = "chi2"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS) -> None:
        self.block_elements = int(block_elements)

    def check(self, features: np.ndarray | torch.Tensor, what: str = "features") -> None:
        t = torch.as_tensor(features)
        if t.numel() and bool((t < 0).any()):
            n_rows = int((t < 0).any(dim=1).sum()) if t.ndim == 2 else 1
            raise LandlensError(
                f"{what} has negative values ({n_rows} row(s), minimum {float(t.min()):.4g}); the chi2 distance "
                f"needs non-negative features (e.g. post-ReLU, without PCA or whitening): choose another --distance"
            )

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return x

    def compute(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        nq, dim = q.shape
        ndb = db.shape[0]
        if out is None:
            out = torch.empty((nq, ndb), dtype=q.dtype, device=q.device)
        if nq == 0 or ndb == 0:
            return out
        # tile so that rows * cols * dim <= block_elements; two tile buffers reused throughout
        cols = max(1, min(ndb, self.block_elements // max(1, dim)))
        rows = max(1, min(nq, self.block_elements // max(1, dim * cols)))
        total = torch.empty((rows, cols, dim), dtype=q.dtype, device=q.device)
        diff = torch.empty_like(total)
        for i in range(0, nq, rows):
            x = q[i:i + rows, None, :]
            for j in range(0, ndb, cols):
                y = db[None, j:j + cols, :]
                r, c = x.shape[0], y.shape[1]
                s, t = total[:r, :c], diff[:r, :c]
                torch.add(x, y, out=s)
                torch.sub(x, y, out=t)
                t.mul_(t).div_(s)
                t.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))  # 0/0 (both zero) -> 0
                torch.sum(t, dim=2, out=out[i:i + r, j:j + c])
        return out.mul_(0.5)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "definition": "0.5 * sum (x-y)^2/(x+y), 0/0 = 0"}


class CallableDistance(BaseDistance):
    """Wraps a plain function ``f(q, db) -> (nq, ndb)`` as a :class:`Distance`."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str | None = None,
                 symmetric: bool = False) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.symmetric = symmetric

    def compute(self, q: torch.Tensor, db: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        value = torch.as_tensor(self.fn(q, db))
        if tuple(value.shape) != (q.shape[0], db.shape[0]):
            raise ValueError(f"distance {self.name!r} returned shape {tuple(value.shape)}, "
                             f"expected {(q.shape[0], db.shape[0])}")
        return _into(out, value)

    def __repr__(self) -> str:
        return f"CallableDistance({self.name!r})"


# --------------------------------------------------------------------------------- registry

DistanceFactory = Callable[..., Distance]

_REGISTRY: dict[str, DistanceFactory | str] = {}
"""Name -> factory, or ``"module:attr"`` naming one that is imported on first use (so this module
never imports the packages that provide distances, e.g. the learned matching metric)."""
_ALIASES: dict[str, str] = {"l1": "manhattan", "l2": "euclidean", "chi-square": "chi2", "chisquare": "chi2"}


def register_distance(name: str, factory: DistanceFactory | str, *, overwrite: bool = False) -> None:
    """Make ``factory(**options)`` available as ``get_distance(name, **options)``.

    ``factory`` is a class or function returning a :class:`Distance` (for instance a learned
    metric that loads its checkpoint), or a ``"module:attr"`` string naming one, imported when
    the distance is first asked for. Registering an existing name raises ``ValueError`` unless
    ``overwrite=True``.
    """
    key = name.strip().lower()
    if not key:
        raise ValueError("a distance needs a non-empty name")
    if (key in _REGISTRY or key in _ALIASES) and not overwrite:
        raise ValueError(f"distance {key!r} is already registered (pass overwrite=True to replace it)")
    _ALIASES.pop(key, None)
    _REGISTRY[key] = factory


def available_distances() -> list[str]:
    """Registered distance names (aliases not included)."""
    return sorted(_REGISTRY)


def get_distance(name_or_callable: str | Distance | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 **options: Any) -> Distance:
    """A :class:`Distance` from a registered name, a :class:`Distance`, or a plain function.

    Unknown names raise :class:`LandlensError` listing the registered ones.
    """
    if isinstance(name_or_callable, str):
        key = name_or_callable.strip().lower()
        key = _ALIASES.get(key, key)
        if key not in _REGISTRY:
            raise LandlensError(f"unknown distance {name_or_callable!r}; available: {', '.join(available_distances())}")
        factory = _REGISTRY[key]
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = _REGISTRY[key] = getattr(importlib.import_module(module), attr)
        return factory(**options)
    if options:
        raise TypeError("options apply only to a distance given by name")
    if isinstance(name_or_callable, Distance):
        return name_or_callable
    if callable(name_or_callable):
        return CallableDistance(name_or_callable)
    raise TypeError(f"not a distance: {name_or_callable!r}")


for _cls in (Euclidean, Cosine, Manhattan, ChiSquare):
    register_distance(_cls.name, _cls)
register_distance("learned", "landlens.matching.scoring:learned")  # residual-dyad discriminator


def pairwise_distances(q: torch.Tensor, db: torch.Tensor,
                       metric: str | Distance | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cosine"
                       ) -> torch.Tensor:
    """Distances ``(nq, ndb)`` between the rows of ``q`` and of ``db`` (see :func:`get_distance`)."""
    return get_distance(metric)(q, db)


def distance_name(distance: Distance) -> str:
    """The recorded name of a distance object."""
    return str(getattr(distance, "name", type(distance).__name__))

