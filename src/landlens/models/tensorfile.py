"""A network's tensors in a safetensors file: written atomically, read back strictly, no pickle.

Shared by every trained-model file landlens writes (classifier, matching autoencoder and
discriminator): each keeps its own JSON description and uses these two functions for the tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from landlens.errors import CheckpointError, first_line


def save_module_tensors(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` to ``path`` (via a ``.part`` file, then renamed)."""
    from safetensors.torch import save_file

    p = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = p.with_name(p.name + ".part")
    save_file(tensors, str(tmp))
    os.replace(tmp, p)
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
