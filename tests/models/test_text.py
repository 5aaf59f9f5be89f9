"""Text towers: the packaged MiniLM encodes as sentence-transformers does, offline; errors are one line."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from fixtures.weights import require

from landlens.errors import WeightsError
from landlens.models.text import MINILM_DISTRIBUTION, create_text_tower, packaged_minilm_zip, unpack_minilm

SENTENCES = [
    "many buildings and green trees are around a playground",
    "a harbor with many boats docked in lines",
    "dense residential area with swimming pools",
    "an airplane is stopped at the airport",
    "",
]


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    require(MINILM_DISTRIBUTION, "transformers", why="the packaged text encoder")
    import os

    os.environ["LANDLENS_TEXT_CACHE"] = str(tmp_path_factory.mktemp("text_cache"))
    try:
        yield create_text_tower("minilm")
    finally:
        os.environ.pop("LANDLENS_TEXT_CACHE", None)


def test_packaged_minilm_matches_sentence_transformers(tower) -> None:  # noqa: ANN001
    require("sentence-transformers", why="the reference implementation")
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(Path(tower.tokenizer.name_or_path)), device="cpu", local_files_only=True)
    want = ref.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    got = tower.encode(SENTENCES)
    assert got.shape == (5, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # batching and padding do not change a sentence's vector
    np.testing.assert_allclose(tower.encode(SENTENCES[:1])[0], got[0], atol=2e-6)
    assert tower.info.dim == 384 and tower.info.max_length == 256 and tower.info.source == "package"


def test_similar_sentences_are_closer(tower) -> None:  # noqa: ANN001
    v = tower.encode(["a harbor with boats", "boats moored in a port", "a desert with sand dunes"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_unpacking_is_done_once_and_checked(tower, tmp_path: Path) -> None:  # noqa: ANN001
    folder, digest = unpack_minilm(cache=tmp_path)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again, digest2 = unpack_minilm(cache=tmp_path)
    assert again == folder and digest2 == digest and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert packaged_minilm_zip().name == "model.zip"


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="text model folder not found"):
        create_text_tower("x", str(tmp_path / "nope"))
    with pytest.raises(WeightsError, match="no config.json"):
        create_text_tower("x", str(tmp_path))
    with pytest.raises(WeightsError, match="no packaged weights for text tower 'bert'"):
        create_text_tower("bert", "package")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(WeightsError, match="unsafe member"):
        unpack_minilm(evil, cache=tmp_path / "cache")
    assert not (tmp_path / "escape.txt").exists()
