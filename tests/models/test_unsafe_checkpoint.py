"""A checkpoint with pickled objects is refused without PyTorch's advice to load it unsafely."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from landlens.errors import WeightsError
from landlens.models.weights import read_checkpoint


def test_unsafe_checkpoint_message_never_suggests_weights_only_false(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, path)  # training scripts do this
    with pytest.raises(WeightsError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert "weights_only" not in msg and "False" not in msg and "\n" not in msg and "\x1b" not in msg
    assert str(path) in msg and "argparse.Namespace" in msg and "never unpickles" in msg


def test_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(WeightsError, match=f"cannot read weights file {path}"):
        read_checkpoint(path)
