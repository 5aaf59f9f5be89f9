"""Test-time group means (``d4:``, ``c4:``, ``flip:`` backbones): the dihedral elements on a
hand-worked array, invariance of the averaged features, agreement with a mean written out with
torch.rot90 / torch.flip, and the name a feature store records."""

from __future__ import annotations

import pytest
import torch

from landlens.errors import BackboneError
from landlens.models.registry import create_backbone
from landlens.models.tta import TTABackbone, dihedral


def test_dihedral_elements_on_a_hand_worked_array() -> None:
    x = torch.tensor([[1, 2], [3, 4]])
    assert dihedral(x, 0).tolist() == [[1, 2], [3, 4]]
    assert dihedral(x, 1).tolist() == [[2, 4], [1, 3]]  # 90 degrees counter-clockwise
    assert dihedral(x, 2).tolist() == [[4, 3], [2, 1]]
    assert dihedral(x, 4).tolist() == [[2, 1], [4, 3]]  # mirror
    assert dihedral(x, 5).tolist() == [[4, 2], [3, 1]]  # rotate, then mirror
    with pytest.raises(ValueError):
        dihedral(x, 8)


@pytest.fixture(scope="module")
def inner():
    torch.manual_seed(0)
    bb = create_backbone("resnet18", "none")
    bb.preprocessing = bb.preprocessing.replace(input_size=32)
    return bb.eval()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_group_mean_is_the_mean_written_out_and_is_invariant(inner) -> None:  # noqa: ANN001
    d4, c4, flip = (TTABackbone(g, inner).eval() for g in ("d4", "c4", "flip"))
    x = _x()
    with torch.inference_mode():
        views = [torch.rot90(x, r, dims=(2, 3)) for r in range(4)]
        want = torch.stack([inner(v) for v in views] + [inner(v.flip(3)) for v in views]).mean(0)
        torch.testing.assert_close(d4(x), want, rtol=1e-5, atol=1e-5)
        for model, move in ((d4, lambda t: torch.rot90(t, 1, dims=(2, 3))), (d4, lambda t: t.flip(2)),
                            (c4, lambda t: torch.rot90(t, 3, dims=(2, 3))), (flip, lambda t: t.flip(3))):
            torch.testing.assert_close(model(move(x)), model(x), rtol=1e-4, atol=1e-5)
        # the plain backbone and a group that does not hold the move are not invariant
        assert not torch.allclose(inner(x.flip(3)), inner(x), atol=1e-3)
        assert not torch.allclose(flip(torch.rot90(x, 1, dims=(2, 3))), flip(x), atol=1e-3)


def test_registry_names_and_describe() -> None:
    bb = create_backbone("c4:resnet18", "none")
    assert isinstance(bb, TTABackbone) and bb.name == "c4:resnet18" and bb.inner.name == "resnet18"
    d = bb.describe()
    assert d["backbone"] == "c4:resnet18" and d["tta"] == "c4" and d["num_features"] == 512
    assert bb.preprocessing == bb.inner.preprocessing
    with pytest.raises(BackboneError, match="test-time group"):
        TTABackbone("c8", bb.inner)


def test_an_archive_of_a_tta_backbone_embeds_queries_the_same_way(tmp_path) -> None:  # noqa: ANN001
    from fixtures.make_datasets import make_folder_dataset

    from landlens.retrieval.archive import Archive

    data = make_folder_dataset(tmp_path / "d", ["a", "b"], per_class=4, size=32)
    plain = Archive.build(data, tmp_path / "plain", backbone="lbp_rgb", rerank=None, progress=False)
    arch = Archive.build(data, tmp_path / "flip", backbone="flip:lbp_rgb", rerank=None, progress=False)
    assert arch.backbone_name == "flip:lbp_rgb"
    assert arch.meta["feature_store"] != plain.meta["feature_store"]  # a store of its own
    first = arch.record(0)
    hit = arch.search(first.path, k=1)[0]  # the file embedded again, through the recorded name
    assert hit.record.id == first.id and hit.distance < 1e-5


def test_a_model_on_a_test_time_mean_saves_and_reloads(tmp_path, inner) -> None:  # noqa: ANN001
    """A classifier and an embedder trained on ``c4:NAME`` reload as ``c4:NAME`` (the loader once knew
    only plain and fusion names) and compute what was saved; the reloaded features stay
    rotation-invariant."""
    from landlens.models.classifier import (Classifier, Embedder, EmbeddingConfig, load_classifier,
                                            load_embedder, save_classifier)

    c4 = TTABackbone("c4", inner)
    x = _x(3)
    for model, load in ((Classifier(c4, ["a", "b", "c"]), load_classifier),
                        (Embedder(c4, ["a", "b"], EmbeddingConfig(dim=8)), load_embedder)):
        save_classifier(model.eval(), tmp_path / type(model).__name__)
        again = load(tmp_path / type(model).__name__)
        assert again.backbone.name == "c4:resnet18" and isinstance(again.backbone, TTABackbone)
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(again(torch.rot90(x, 1, (-2, -1))), model(x), atol=1e-4, rtol=1e-4)
