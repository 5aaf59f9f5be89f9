"""A network's tensors in a safetensors file: written atomically, read back strictly, no pickle.

Shared by every trained-model file landlens writes (classifier, matching autoencoder and
discriminator): each keeps its own JSON description and uses these two functions for the tensors.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landlens.atomic import atomic_path
from landlens.errors import CheckpointError, WeightsError, first_line

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_tensors_only(path: str | os.PathLike[str], *, what: str = "weights file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, failures as one :class:`WeightsError` line.

    A file that holds Python objects besides tensors and plain containers is refused naming the
    first such object. The message never passes on PyTorch's advice to re-run with
    ``weights_only=False``: that executes the file's code, never right for a file of unknown
    origin.
    """
    p = Path(path)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSAFE_GLOBAL.search(str(exc))
        obj = f" ({found.group(1)})" if found else ""
        raise WeightsError(
            f"cannot read {what} {p}: it holds Python objects besides tensors{obj}, which landlens "
            "never unpickles; save its state dict as .safetensors (or a plain torch.save of the "
            "state dict) where you trust the file") from None
    except Exception as exc:  # noqa: BLE001 - corrupt file, not a torch checkpoint
        raise WeightsError(f"cannot read {what} {p}: {first_line(exc, 200)}") from None


def save_module_tensors(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` to ``path`` (atomically: :func:`landlens.atomic.atomic_path`)."""
    from safetensors.torch import save_file

    p = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp))
    return p


def load_module_tensors(model: nn.Module, path: str | os.PathLike[str], *, what: str, described: str,
                        map_location: str = "cpu") -> None:
    """Load the tensors at ``path`` into ``model`` strictly.

    Args:
        what: the kind of weights, for the missing-file message (``'trained'``, ``'autoencoder'``).
        described: what the model was built as, for the mismatch message.

    Raises:
        CheckpointError: a missing or unreadable file, or tensors that do not fit ``model``
            (missing, unexpected or of another shape), naming the file.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no {what} weights at {p}")
    try:
        tensors = load_file(str(p), device=map_location)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's problem
        raise CheckpointError(f"cannot read {p}: {first_line(exc)}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape mismatch at {wrong[:3]}")
        raise CheckpointError(f"{p} does not fit {described}: {detail}")
    model.load_state_dict(tensors, strict=True)


__all__ = ["load_module_tensors", "save_module_tensors"]
