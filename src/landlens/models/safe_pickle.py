"""Read pickled numpy weights without running arbitrary code.

Some packages ship their weights as a plain :mod:`pickle` of numpy arrays (for example the
SqueezeNet weights of ``ndf``). ``pickle.load`` on such a file would import and call whatever
the file names, so landlens never uses it (see the design notes: *no arbitrary pickle
loading*). :class:`RestrictedUnpickler` resolves only the handful of globals that numpy arrays
and plain containers need and refuses everything else with a :class:`~landlens.errors.WeightsError`.

The allow-list follows the globals numpy itself emits when pickling an array
(``numpy._core.multiarray._reconstruct``, ``ndarray``, ``dtype``, ``scalar``, and for
protocol 5 ``numpy._core.numeric._frombuffer``; see ``ndarray.__reduce__`` /
``__reduce_ex__`` in ``numpy/_core/src/multiarray/methods.c``), under both the numpy 1.x
(``numpy.core``) and numpy 2.x (``numpy._core``) module names, plus ``_codecs.encode`` with
latin-1, which protocols 0-2 use to carry raw bytes. Object dtypes are refused, so no Python
object other than containers, numbers and strings can come out.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from landlens.errors import WeightsError

try:  # numpy >= 2: the real module; importing numpy.core would only add a deprecation warning
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]


def _safe_dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype:
    """``numpy.dtype`` as the unpickler calls it, refusing object dtypes (they hold Python objects)."""
    dt = np.dtype(obj, align=align, copy=copy)
    if dt.hasobject:
        raise WeightsError(f"pickled weights contain an object dtype ({dt}); refusing to load")
    return dt


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` restricted to plain ``ndarray``."""
    if subtype is not np.ndarray:
        raise WeightsError(f"pickled weights reconstruct a {subtype!r}, only numpy.ndarray is allowed")
    return _multiarray._reconstruct(subtype, shape, dtype)


def _safe_scalar(dtype: np.dtype, data: bytes = b"") -> Any:
    """``numpy.core.multiarray.scalar`` (a numpy scalar such as ``np.float32(1.0)``)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise WeightsError(f"pickled weights contain a scalar of dtype {dtype!r}; refusing to load")
    return _multiarray.scalar(dtype, data)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: str, axis_order: Any = None) -> np.ndarray:
    """``numpy._core.numeric._frombuffer`` (arrays in pickle protocol 5)."""
    dt = _safe_dtype(dtype)
    array = np.frombuffer(buf, dtype=dt).copy()  # own, writable memory
    if order == "K" and axis_order is not None:
        return array.reshape(shape, order="C").transpose(axis_order)
    return array.reshape(shape, order=order)


def _safe_codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocols 0-2 use it to carry array bytes (latin-1 text only)."""
    if not isinstance(obj, str) or encoding.lower().replace("-", "") != "latin1":
        raise WeightsError(f"pickled weights call _codecs.encode with {encoding!r}; refusing to load")
    return obj.encode("latin1", errors)


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _safe_reconstruct
    _ALLOWED[(_mod, "scalar")] = _safe_scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _safe_frombuffer
_ALLOWED[("_codecs", "encode")] = _safe_codecs_encode
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = _safe_dtype
_ALLOWED[("collections", "OrderedDict")] = collections.OrderedDict
for _name, _obj in (("dict", dict), ("list", list), ("tuple", tuple), ("set", set),
                    ("frozenset", frozenset)):
    _ALLOWED[("builtins", _name)] = _obj
    _ALLOWED[("__builtin__", _name)] = _obj  # protocol 0-2 pickles written by Python 2


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that can only build numpy arrays and plain containers.

    Any other global (``os.system``, ``builtins.eval``, a class of some package ...) raises
    :class:`~landlens.errors.WeightsError` before it is imported or called. Persistent ids
    and extension codes are refused too.
    """

    def __init__(self, file: BinaryIO, *, source: str = "<pickle>") -> None:
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self._source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle API
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise WeightsError(
                f"{self._source}: refusing to unpickle global {module}.{name} "
                "(only numpy arrays and plain containers are allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle API
        raise WeightsError(f"{self._source}: refusing persistent id {pid!r} in pickled weights")


def safe_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except WeightsError as exc:
        if str(exc).startswith(f"{source}:"):
            raise
        raise WeightsError(f"{source}: {exc}") from None
    except Exception as exc:  # truncated or corrupt file
        raise WeightsError(f"{source}: cannot read pickled weights: {exc}") from exc


def safe_load(path: str | Path) -> Any:
    """Unpickle the file at ``path`` with :class:`RestrictedUnpickler`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights file: {exc.strerror or exc}") from exc
    return safe_loads(data, source=str(path))


__all__ = ["RestrictedUnpickler", "safe_load", "safe_loads"]
