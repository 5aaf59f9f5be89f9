"""A fitted re-ranker's state: written to a file, read back, restored without learning again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from landlens.retrieval.rerank import DEFAULT_RERANK, make_reranker
from landlens.retrieval.rerank.clusters import ClusterLDA
from landlens.retrieval.rerank.kreciprocal import KReciprocal

KEPT = [DEFAULT_RERANK, "kreciprocal:k1=12,k2=4", "clusterlda:kmin=4,kmax=12,steps=3",
        "clusterlda:kmin=4,kmax=12,steps=2+diffusion:k=8,kq=4", "aqe:n=2+kreciprocal:k1=10,k2=3"]


@pytest.fixture(scope="module")
def db() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 24))
    return (centres[rng.integers(0, 6, 150)] + 0.6 * rng.normal(size=(150, 24))).astype(np.float32)


def _round_trip(state: dict[str, np.ndarray], tmp_path: Path) -> dict[str, np.ndarray]:
    save_file(state, str(tmp_path / "state.safetensors"))
    return load_file(tmp_path / "state.safetensors")


def _no_learning(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object, x: object) -> None:
        raise AssertionError("learned again instead of restoring")

    monkeypatch.setattr(ClusterLDA, "_fit", refuse)
    monkeypatch.setattr(KReciprocal, "_fit", refuse)


@pytest.mark.parametrize("spec", KEPT)
def test_a_restored_reranker_ranks_as_the_fitted_one_without_learning(spec: str, db: np.ndarray, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fitted = make_reranker(spec).fit(db)
    assert not fitted.restored_
    state = _round_trip(fitted.fitted_state(), tmp_path)  # through a file: a strided array once came back scrambled
    queries = np.random.default_rng(1).normal(size=(4, 24)).astype(np.float32)
    want_out, want_in = fitted.distances(queries).numpy(), fitted.distances(db[:9]).numpy()
    _no_learning(monkeypatch)
    restored = make_reranker(spec).fit(db, state=state)
    assert restored.restored_ and restored.to_dict()["restored"] is True
    np.testing.assert_array_equal(restored.distances(queries).numpy(), want_out)  # queries from outside
    np.testing.assert_array_equal(restored.distances(db[:9]).numpy(), want_in)  # database rows (their own nodes)


def test_a_state_is_restored_only_for_its_database_and_its_settings(db: np.ndarray, tmp_path: Path) -> None:
    spec = "clusterlda:kmin=4,kmax=12,steps=3+kreciprocal:k1=12,k2=4"
    state = _round_trip(make_reranker(spec).fit(db).fitted_state(), tmp_path)
    other = db.copy()
    other[3, 0] += 1.0
    moved = make_reranker(spec).fit(other, state=state)
    assert not moved.restored_
    np.testing.assert_array_equal(moved.distances(other[:5]).numpy(),
                                  make_reranker(spec).fit(other).distances(other[:5]).numpy())
    assert not make_reranker("clusterlda:kmin=4,kmax=12,steps=3+kreciprocal:k1=10,k2=4").fit(db, state=state).restored_
    assert not make_reranker(spec).fit(db, state={"spec": state["spec"]}).restored_  # no digest: learned
    # a method whose fit is as cheap as a load keeps nothing
    assert make_reranker("aqe+diffusion").fit(db).fitted_state() == {}
