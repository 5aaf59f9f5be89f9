"""Export a trained classifier (a run directory) to TorchScript or ONNX, checked against the checkpoint.

Both exports take what the network itself takes: a normalised float32 batch ``image`` of shape
(B, 3, S, S), S being the model's ``preprocessing.input_size``, produced by the preprocessing
recorded with the model (resize and centre crop, then ``(x / 255 - mean) / std``, see
:mod:`landlens.models.preprocessing`); they return ``log_probs`` (B, C), log-softmax over the
classes in ``model.json`` order. Decoding and resizing stay outside the exported graph, so the
consumer must apply the recorded preprocessing, which travels inside the file:

- TorchScript (``torch.jit.trace``): ``model.json`` is embedded as an extra file, read back with
  ``torch.jit.load(path, _extra_files={"model.json": ""})`` or :func:`read_export_meta`.
- ONNX (``torch.onnx.export``): the model's ``metadata_props`` hold ``landlens.classes`` (JSON
  list), ``landlens.preprocessing`` (JSON object), ``landlens.model`` (the whole ``model.json``),
  ``landlens.input`` and ``landlens.output`` (tensor names).

Which ONNX exporter: torch >= 2.9 defaults to the ``torch.export``-based ("dynamo") exporter.
For the CNNs landlens trains (timm and torchvision backbones with a linear, MLP or SE head) it
was measured here (torch 2.14, onnxscript 0.7) to always produce opset 18 and then fail to convert
that down to a requested opset 17 (``No Adapter To Version 17 for Pad``; ``axes_input_to_attribute``)
while printing progress to stdout, and to take 6-12 s where the TorchScript-based exporter takes
0.2-5 s. This module therefore uses the TorchScript-based exporter (``dynamo=False``), which
honours ``opset`` exactly, works offline and matched the checkpoint to < 1e-6 on SqueezeNet 1.1,
ResNet-18 and EfficientNet-Lite0; its deprecation warning is silenced. If it fails (a future torch
that no longer ships it, or an operator it cannot trace), the dynamo exporter is tried once; that
file may then carry opset 18 whatever ``opset`` asked (recorded in :attr:`ExportResult.opset`).
``torch.jit.trace`` is marked deprecated from torch 2.10 on as well; it still traces these CNNs
exactly (parity 0.0 measured), and its FutureWarning is silenced.

Every export is verified before it is kept: :func:`check_export_parity` runs the exported file
(onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) and the checkpoint on the same seeded
random images (random uint8 pixels normalised with the model's preprocessing), at a batch size
different from the one traced when the batch is dynamic, and the file is written under a
temporary name in the target folder and renamed into place only when the largest absolute
difference of the log-probabilities is at most ``atol``. A failed export leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landlens.atomic import atomic_path
from landlens.errors import CheckpointError, ConfigError, first_line

EXPORT_FORMATS = ("onnx", "torchscript")
DEFAULT_FILENAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME = "image"
OUTPUT_NAME = "log_probs"
TORCHSCRIPT_META = "model.json"
"""Name of the extra file holding ``model.json`` inside a TorchScript export."""
ONNX_META_PREFIX = "landlens."
TRACE_BATCH = 2
"""Batch size of the example input traced when the batch is dynamic (not 1, so that no size-1
dimension can be specialised away); parity is then checked at another batch size."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        path: the exported file.
        format: ``'onnx'`` or ``'torchscript'``.
        max_abs_diff: largest absolute difference of log-probabilities between the export and
            the checkpoint on the parity inputs.
        seconds: wall time of export and check.
        exporter: the exporter used (``'torch.jit.trace'``, ``'torchscript-onnx'`` or ``'dynamo-onnx'``).
        opset: the ONNX opset of the file (``None`` for TorchScript); the dynamo fallback may
            write a newer opset than requested when it cannot convert down.
        n_checked: number of random images of the parity check.
    """

    path: Path
    format: str
    max_abs_diff: float
    seconds: float
    exporter: str
    opset: int | None = None
    n_checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "max_abs_diff": float(self.max_abs_diff),
                "seconds": float(self.seconds), "exporter": self.exporter, "opset": self.opset,
                "n_checked": int(self.n_checked)}


def _run_dir(run_dir: str | os.PathLike[str]) -> Path:
    p = Path(run_dir)
    return p.parent if p.suffix == ".json" else p


def _target(run_dir: Path, fmt: str, out_path: str | os.PathLike[str] | None) -> Path:
    if out_path is None:
        return run_dir / DEFAULT_FILENAMES[fmt]
    out = Path(out_path)
    if out.is_dir():
        return out / DEFAULT_FILENAMES[fmt]
    return out


def _parity_inputs(pre: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` random images (uint8 pixels, seeded) normalised with the model's preprocessing."""
    from landlens.models.preprocessing import normalize_batch

    g = torch.Generator().manual_seed(int(seed))
    s = int(pre.input_size)
    pixels = torch.randint(0, 256, (n, s, s, 3), generator=g, dtype=torch.int64).to(torch.uint8)
    return normalize_batch(pixels, pre).contiguous()


def detect_format(path: str | os.PathLike[str]) -> str:
    """``'torchscript'`` (a zip archive) or ``'onnx'`` (anything else), from the file's content."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no exported model at {p}")
    return "torchscript" if zipfile.is_zipfile(p) else "onnx"


def read_export_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model.json`` content stored inside an exported TorchScript or ONNX file."""
    p = Path(path)
    fmt = detect_format(p)
    try:
        if fmt == "torchscript":
            extra = {TORCHSCRIPT_META: ""}
            _jit_load(p, extra)
            return json.loads(extra[TORCHSCRIPT_META])
        import onnx

        model = onnx.load(str(p), load_external_data=False)
        props = {e.key: e.value for e in model.metadata_props}
        return json.loads(props[ONNX_META_PREFIX + "model"])
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{p}: no landlens metadata in this {fmt} file ({first_line(exc)})") from None


def _jit_load(path: Path, extra_files: dict[str, Any] | None = None) -> Any:
    """``torch.jit.load`` on the CPU, without the deprecation warnings of torch >= 2.10."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if extra_files is None:
            return torch.jit.load(str(path), map_location="cpu")
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)


def _exported_runner(path: Path, fmt: str):
    """A function (B, 3, S, S) float tensor -> (B, C) numpy log-probs, and the fixed batch or None."""
    if fmt == "torchscript":
        try:
            module = _jit_load(path)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's problem
            raise CheckpointError(f"cannot load TorchScript file {path}: {first_line(exc)}") from None
        module.eval()

        def run_ts(x: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return module(x).float().numpy()

        return run_ts, None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's problem
        raise CheckpointError(f"cannot load ONNX file {path}: {first_line(exc)}") from None
    inp = sess.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def run_onnx(x: torch.Tensor) -> np.ndarray:
        return np.asarray(sess.run(None, {inp.name: x.contiguous().numpy()})[0], dtype=np.float32)

    return run_onnx, batch


def check_export_parity(run_dir: str | os.PathLike[str], exported_path: str | os.PathLike[str], *, n: int = 4,
                        atol: float | None = 1e-4, seed: int = 0) -> float:
    """Largest absolute difference of log-probabilities between an export and its checkpoint.

    Both are run on the same ``n`` seeded random images, normalised with the model's
    preprocessing (an ONNX file exported with a fixed batch is run in chunks of that batch).

    Args:
        run_dir: the run directory of the checkpoint (``model.json`` + ``model.safetensors``).
        exported_path: a TorchScript or ONNX file (told apart by content).
        n: number of random images.
        atol: raise :class:`CheckpointError` when the difference exceeds it (``None``: never).
        seed: seed of the random images.

    Raises:
        CheckpointError: missing or unreadable files, outputs of another shape, or a difference
            above ``atol``.
    """
    from landlens.models.classifier import load_classifier

    if int(n) < 1:
        raise ConfigError(f"parity check needs at least 1 image, got n={n}")
    path = Path(exported_path)
    fmt = detect_format(path)
    model = load_classifier(run_dir)
    run, fixed = _exported_runner(path, fmt)
    count = int(n)
    if fixed is not None and fixed > 0:
        count = -(-count // fixed) * fixed
    x = _parity_inputs(model.preprocessing, count, seed)
    with torch.inference_mode():
        ref = model(x).float().numpy()
    step = fixed if fixed else count
    try:
        got = np.concatenate([run(x[i:i + step]) for i in range(0, count, step)])
    except Exception as exc:  # noqa: BLE001 - an export that does not run on its own inputs
        raise CheckpointError(f"{path}: the exported model fails on a {tuple(x.shape)} input: "
                              f"{first_line(exc)}") from None
    if got.shape != ref.shape:
        raise CheckpointError(f"{path}: exported model outputs shape {got.shape}, the checkpoint {ref.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    if not np.isfinite(diff):
        diff = float("inf")
    if atol is not None and diff > float(atol):
        raise CheckpointError(f"{path}: exported model differs from checkpoint {_run_dir(run_dir)} by "
                              f"{diff:.3g} in log-probabilities (limit {float(atol):g})")
    return diff


def _trace_torchscript(model: torch.nn.Module, example: torch.Tensor, meta_text: str, tmp: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 marks torch.jit deprecated
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_META: meta_text})


def _onnx_proto(model: torch.nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool) -> tuple[Any, str]:
    """The exported ``onnx.ModelProto`` and the exporter name (see the module docstring)."""
    import onnx

    first_error: BaseException | None = None
    try:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                model, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
                opset_version=int(opset), do_constant_folding=True, dynamo=False)
        return onnx.load_from_string(buf.getvalue()), "torchscript-onnx"
    except Exception as exc:  # noqa: BLE001 - fall back to the other exporter once
        first_error = exc
    try:
        import contextlib

        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=shapes, opset_version=int(opset), dynamo=True, verbose=False)
        return program.model_proto, "dynamo-onnx"
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"ONNX export failed: {first_line(first_error)}; "
                              f"the dynamo exporter also failed: {first_line(exc)}") from None


def export_model(run_dir: str | os.PathLike[str], format: str, out_path: str | os.PathLike[str] | None = None, *,
                 opset: int = 17, dynamic_batch: bool = True, atol: float = 1e-4, n: int = 4,
                 seed: int = 0) -> ExportResult:
    """Export a run directory's classifier to ``format`` and verify it (see the module docstring).

    Args:
        run_dir: the run directory (``model.json`` + ``model.safetensors``).
        format: ``'onnx'`` or ``'torchscript'``.
        out_path: file to write, or a folder; default ``RUN/model.onnx`` or ``RUN/model.torchscript.pt``.
        opset: ONNX opset version (ONNX only).
        dynamic_batch: ONNX input/output batch dimension left free (otherwise fixed to 1);
            TorchScript traces of these CNNs accept any batch size.
        atol: largest accepted difference of log-probabilities against the checkpoint.
        n, seed: parity check images (see :func:`check_export_parity`).

    Raises:
        ConfigError: an unknown format.
        CheckpointError: no usable checkpoint, an export that fails, or one that differs from the
            checkpoint by more than ``atol`` (the file is then removed).
    """
    from landlens.models.classifier import load_classifier, read_model_meta

    fmt = str(format).lower()
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    start = time.perf_counter()
    rdir = _run_dir(run_dir)
    meta = read_model_meta(rdir)
    model = load_classifier(rdir).eval()
    out = _target(rdir, fmt, out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    s = int(model.preprocessing.input_size)
    batch = TRACE_BATCH if (dynamic_batch or fmt == "torchscript") else 1
    example = _parity_inputs(model.preprocessing, batch, seed + 1)
    meta_text = json.dumps(meta, indent=2, sort_keys=True)
    written_opset: int | None = None
    tmp = out
    try:
        with atomic_path(out) as tmp:
            if fmt == "torchscript":
                _trace_torchscript(model, example, meta_text, tmp)
                exporter = "torch.jit.trace"
            else:
                import onnx

                proto, exporter = _onnx_proto(model, example, opset, dynamic_batch)
                props = {
                    "classes": json.dumps(list(model.classes)),
                    "preprocessing": json.dumps(model.preprocessing.to_dict(), sort_keys=True),
                    "model": meta_text,
                    "input": json.dumps({"name": INPUT_NAME, "shape": ["batch" if dynamic_batch else 1, 3, s, s],
                                         "dtype": "float32", "layout": "NCHW, normalised with preprocessing"}),
                    "output": json.dumps({"name": OUTPUT_NAME, "shape": ["batch" if dynamic_batch else 1,
                                                                         len(model.classes)],
                                          "meaning": "log-softmax over classes"}),
                }
                del proto.metadata_props[:]
                for key, value in props.items():
                    entry = proto.metadata_props.add()
                    entry.key, entry.value = ONNX_META_PREFIX + key, value
                proto.doc_string = (f"landlens classifier: {meta['backbone']} + {meta['head'].get('kind')} head, "
                                    f"{len(model.classes)} classes")
                written_opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
                onnx.checker.check_model(proto)
                onnx.save(proto, str(tmp))
            diff = check_export_parity(rdir, tmp, n=n, atol=atol, seed=seed)
    except CheckpointError as exc:  # the file that failed is the temporary one: name the target
        raise CheckpointError(str(exc).replace(str(tmp), str(out)) + "; nothing written") from None
    return ExportResult(path=out, format=fmt, max_abs_diff=diff, seconds=time.perf_counter() - start,
                        exporter=exporter, opset=written_opset, n_checked=int(n))




def export_torchscript(run_dir: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None) -> Path:
    """Trace the classifier with ``torch.jit.trace`` and save it with ``model.json`` embedded.

    Input ``(B, 3, S, S)`` normalised float32, output log-probabilities ``(B, C)``. Verified with
    :func:`check_export_parity` (``atol`` 1e-4) before it is renamed into place. Returns the path
    (default ``RUN/model.torchscript.pt``).
    """
    return export_model(run_dir, "torchscript", out_path).path


def export_onnx(run_dir: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None, *,
                opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Export the classifier to ONNX (input ``image``, output ``log_probs``) with landlens metadata.

    Uses the TorchScript-based exporter (see the module docstring for why), stores class names
    and preprocessing in ``metadata_props`` and verifies the file with onnxruntime against the
    checkpoint (``atol`` 1e-4) before it is renamed into place. Returns the path (default
    ``RUN/model.onnx``).
    """
    return export_model(run_dir, "onnx", out_path, opset=opset, dynamic_batch=dynamic_batch).path


__all__ = [
    "DEFAULT_FILENAMES",
    "EXPORT_FORMATS",
    "ExportResult",
    "check_export_parity",
    "detect_format",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "read_export_meta",
]
