"""Preparing a backbone for inference: a traced-and-frozen or compiled graph, checked against
eager mode (:func:`optimize_for_inference`), and the seeded noise batch it is prepared on.

Both extraction engines (:mod:`landlens.features.extract` locally, each actor of
:mod:`landlens.features.ray_engine`), archives serving queries and the service use it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from landlens.errors import LandlensError, first_line
from landlens.models.preprocessing import Preprocessing, normalize_batch

Optimize = Literal["auto", "jit", "compile", "none"]


COMPILE_MIN_IMAGES = 2000
"""``auto`` compiles (about half a minute to a minute) only for runs at least this long."""


def _compiler_available() -> bool:
    import shutil

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


def noise_batch(pre: Preprocessing, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded noise images at the backbone's input size, normalised as ``pre`` says: the
    example a graph is prepared and checked on."""
    size = pre.input_size
    pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return normalize_batch(torch.from_numpy(pixels), pre)


def optimize_for_inference(model: nn.Module, example: torch.Tensor, mode: Optimize = "auto",
                           n_images: int | None = None) -> Callable:
    """Return a faster callable computing the same function as ``model`` (eval mode).

    ``jit``: trace, freeze and ``torch.jit.optimize_for_inference`` (batch-norm folded into
    convolutions, oneDNN weights prepacked; seconds to prepare). ``compile``:
    ``torch.compile`` with inductor freezing (fastest per image; half a minute to a minute to
    compile, needs a C compiler). ``auto``: ``compile`` for runs of at least
    :data:`COMPILE_MIN_IMAGES` images where a compiler exists, else ``jit``; any failure
    falls back to the next simpler mode. ``none``: eager. Every optimised graph is checked
    against eager mode on ``example`` before use.
    """
    model = model.eval().to(memory_format=torch.channels_last)
    if mode == "none":
        return model
    with torch.inference_mode():  # the graph is used on inference tensors: guard on those
        example = example.clone()
    chain: list[str]
    if mode == "auto":
        big = n_images is not None and n_images >= COMPILE_MIN_IMAGES
        chain = (["compile"] if big and _compiler_available() else []) + ["jit"]
    else:
        chain = [mode]
    for step in chain:
        try:
            return _compile(model, example) if step == "compile" else _jit(model, example)
        except Exception as exc:  # noqa: BLE001 - an optimisation that fails is skipped, eager is exact
            if mode != "auto":
                raise LandlensError(f"cannot prepare the backbone with --optimize {mode}: {first_line(exc, 200)}") from None
    return model


def prepared_forward(model: nn.Module, pre: Preprocessing, mode: str = "jit") -> Callable | None:
    """A faster forward pass of ``model`` for a long-running caller (an archive answering
    queries, a predictor mapping a scene), prepared and checked on two noise images in the
    channels-last layout those callers feed it: ``jit`` (eager where tracing fails) or
    ``compile``; ``None`` when eager mode stays in place."""
    example = noise_batch(pre, 2).contiguous(memory_format=torch.channels_last)
    fast = optimize_for_inference(model, example, mode="auto" if mode == "jit" else mode)  # type: ignore[arg-type]
    return None if fast is model else fast


__all__ = ["COMPILE_MIN_IMAGES", "Optimize", "noise_batch", "optimize_for_inference", "prepared_forward"]
