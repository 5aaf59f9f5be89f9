"""Preparing a backbone for inference: an ONNX Runtime session, a traced-and-frozen or compiled
graph, checked against eager mode (:func:`optimize_for_inference`), and the seeded noise batch it
is prepared on.

Both extraction engines (:mod:`landlens.features.extract` locally, each actor of
:mod:`landlens.features.ray_engine`), archives serving queries and the service use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from landlens.atomic import atomic_path
from landlens.errors import LandlensError, first_line
from landlens.models.preprocessing import Preprocessing, normalize_batch

Optimize = Literal["auto", "onnx", "jit", "compile", "none"]


COMPILE_MIN_IMAGES = 2000
"""``auto`` compiles (about half a minute to a minute) only for runs at least this long."""

ONNX_MIN_IMAGES = 500
"""``auto`` exports to ONNX Runtime only for runs at least this long: on 2 cores with
EfficientNet-Lite0 the export takes 6 to 8 s and the extraction loop then runs about 4x as many
images per second as the traced graph, so the export pays for itself after about 450 images
(``benchmarks/results/extract_throughput_tf_efficientnet_lite0.md``)."""

ONNX_CACHE_DIR = Path("runs/onnx")
"""Where exported ONNX graphs are kept (relative to the working folder, beside the feature cache
``runs/features``), one file per model weights, input size and torch version: a later run
loads the file instead of exporting again. A cached graph is checked against eager mode like a
fresh export, and exported again when it does not agree or cannot be read."""


def _compiler_available() -> bool:
    return any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def _same(fast: Callable, model: nn.Module, example: torch.Tensor) -> None:
    """Check ``fast`` against eager mode on the first rows of ``example`` (a full batch is run
    through ``fast``, which also triggers compilation for that shape)."""
    with torch.inference_mode():
        got = fast(example)[:2]
        ref = model(example[:2])
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"optimised graph differs from eager (max abs diff {(got - ref).abs().max():.2e})")


def _jit(model: nn.Module, example: torch.Tensor) -> Callable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode():
            traced = torch.jit.trace(model, example[:2], check_trace=False)
            fast = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        # checked on other pixels than those traced: a graph that baked a value in would pass on those
        _same(fast, model, torch.flip(example[:2], dims=(-1,)))
    return fast


def _compile(model: nn.Module, example: torch.Tensor) -> Callable:
    import logging

    import torch._inductor.config as inductor_config

    # a CPU-only run needs no CUDA: torch's notice that it found none is noise for users, so it
    # is held back while compiling (and the logger's level restored after: a library does not
    # change the application's logging). freezing: weights become constants, so batch-norm
    # folds into convolutions and oneDNN prepacks the weights (what makes the compiled CPU
    # graph fast); compilation happens on the first call, inside the patch
    notice = logging.getLogger("torch.utils.cpp_extension")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        with inductor_config.patch(freezing=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = torch.compile(model, dynamic=False)
            _same(fast, model, example)
    finally:
        notice.setLevel(level)
    return fast


def onnx_runtime() -> Any:
    """``onnxruntime``, or one line saying how to install it (with ``onnxscript``, which
    ``torch.onnx.export`` needs)."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - the exporter's dependency
    except ImportError:
        raise LandlensError("--optimize onnx needs ONNX Runtime: pip install 'landlens[onnx]' "
                            "(or pip install onnxruntime onnx onnxscript)") from None
    return onnxruntime


class _NHWC(nn.Module):
    """``model`` on the NHWC view of a channels-last batch: the exported graph takes the batch's
    memory as it is (no layout copy before each run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export ``model`` (eval mode) to the ONNX file ``path`` with ``torch.onnx.export``: the
    input size of ``example``, any batch size, the input an NHWC float batch (the memory of
    the channels-last batches :func:`normalize_batch` makes)."""
    onnx_runtime()
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nhwc = example[:2].permute(0, 2, 3, 1).contiguous().clone()  # not an inference tensor: export traces it
        torch.onnx.export(_NHWC(model.eval()), (nhwc,), str(path), input_names=["x"], output_names=["features"],
                          dynamic_shapes=({0: "batch"},), dynamo=True, verbose=False, artifacts_dir=path.parent,
                          external_data=False)  # one self-contained file (the backbones are far below 2 GB)
    return path


def onnx_forward(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running the ONNX file ``path`` (as :func:`export_onnx` writes it) in an ONNX
    Runtime session: every graph optimisation, torch's intra-op thread count, threads that sleep
    rather than spin between runs (the caller normalises the next batch with torch and decode
    workers share the cores meanwhile); it takes a normalised (B, C, H, W) batch, best
    channels-last, and returns a torch tensor."""
    ort = onnx_runtime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        nhwc = x.detach().permute(0, 2, 3, 1).contiguous()  # a view of a channels-last batch
        return torch.from_numpy(session.run(None, {"x": nhwc.numpy()})[0])

    return forward


def onnx_cache_key(model: nn.Module, example: torch.Tensor) -> str:
    """What an exported graph depends on, hashed: the model's class, every weight and buffer
    (names, shapes, bytes), the input's size and the exporting torch version."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}|{tuple(example.shape[1:])}|"
                       f"{torch.__version__}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _onnx(model: nn.Module, example: torch.Tensor) -> Callable:
    check = torch.flip(example, dims=(-1,))  # other pixels than those exported, at the full batch size
    cached = ONNX_CACHE_DIR / f"{onnx_cache_key(model, example)}.onnx"
    if cached.is_file():
        try:
            fast = onnx_forward(cached)
            _same(fast, model, check)
            return fast
        except Exception:  # noqa: BLE001 - damaged or not this model after all: export again
            with contextlib.suppress(OSError):
                cached.unlink()
    # the session holds the weights once created: the exported file is only kept as the cache
    with tempfile.TemporaryDirectory(prefix="landlens-onnx-", ignore_cleanup_errors=True) as tmp:
        exported = export_onnx(model, example, Path(tmp) / "model.onnx")
        fast = onnx_forward(exported)
        _same(fast, model, check)
        with contextlib.suppress(OSError):  # a read-only working folder: no cache, same result
            with atomic_path(cached) as part:
                shutil.copyfile(exported, part)
    return fast


def noise_batch(pre: Preprocessing, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded noise images at the backbone's input size, normalised as ``pre`` says: the
    example a graph is prepared and checked on."""
    size = pre.input_size
    pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return normalize_batch(torch.from_numpy(pixels), pre)


def optimize_for_inference(model: nn.Module, example: torch.Tensor, mode: Optimize = "auto",
                           n_images: int | None = None) -> Callable:
    """Return a faster callable computing the same function as ``model`` (eval mode).

    ``onnx``: exported with ``torch.onnx.export`` and run by ONNX Runtime (:func:`export_onnx`,
    :func:`onnx_forward`; seconds to prepare the first time, then loaded from
    :data:`ONNX_CACHE_DIR`; needs ``landlens[onnx]``). ``jit``: trace, freeze
    and ``torch.jit.optimize_for_inference`` (batch-norm folded into convolutions, oneDNN weights
    prepacked; seconds to prepare). ``compile``: ``torch.compile`` with inductor freezing (half a
    minute to a minute to compile, needs a C compiler). ``auto``: ``onnx`` for runs of at least
    :data:`ONNX_MIN_IMAGES` images where ONNX Runtime is installed, then ``compile`` for runs of
    at least :data:`COMPILE_MIN_IMAGES` images where a compiler exists, then ``jit``; any failure
    falls back to the next mode. ``none``: eager. Every optimised graph is checked against eager
    mode on ``example`` before use.
    """
    model = model.eval().to(memory_format=torch.channels_last)
    if mode == "none":
        return model
    with torch.inference_mode():  # the graph is used on inference tensors: guard on those
        example = example.clone()
    chain: list[str]
    if mode == "auto":
        n = -1 if n_images is None else n_images
        chain = ((["onnx"] if n >= ONNX_MIN_IMAGES else [])
                 + (["compile"] if n >= COMPILE_MIN_IMAGES and _compiler_available() else []) + ["jit"])
    else:
        chain = [mode]
    prepare = {"onnx": _onnx, "compile": _compile, "jit": _jit}
    for step in chain:
        try:
            return prepare[step](model, example)
        except LandlensError:  # onnxruntime missing: its own line says how to install it
            if mode != "auto":
                raise
        except Exception as exc:  # noqa: BLE001 - an optimisation that fails is skipped, eager is exact
            if mode != "auto":
                raise LandlensError(f"cannot prepare the backbone with --optimize {mode}: {first_line(exc, 200)}") from None
    return model


def prepared_forward(model: nn.Module, pre: Preprocessing, mode: str = "jit") -> Callable | None:
    """A faster forward pass of ``model`` for a long-running caller (an archive answering
    queries, a predictor mapping a scene), prepared and checked on two noise images in the
    channels-last layout those callers feed it: ``jit`` (eager where tracing fails),
    ``compile`` or ``onnx``; ``None`` when eager mode stays in place."""
    example = noise_batch(pre, 2).contiguous(memory_format=torch.channels_last)
    fast = optimize_for_inference(model, example, mode="auto" if mode == "jit" else mode)  # type: ignore[arg-type]
    return None if fast is model else fast


__all__ = ["COMPILE_MIN_IMAGES", "ONNX_CACHE_DIR", "ONNX_MIN_IMAGES", "Optimize", "export_onnx", "noise_batch",
           "onnx_cache_key", "onnx_forward", "onnx_runtime", "optimize_for_inference", "prepared_forward"]
