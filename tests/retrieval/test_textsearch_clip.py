"""Search by words with a CLIP-family checkpoint (no training): `landlens retrieval align --clip`
writes an identity alignment, an archive built on the CLIP image tower answers text queries in
the order open_clip's own encode_text / encode_image give (a tiny random model saved to a file,
since no published checkpoint is reachable offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fixtures.make_datasets import make_folder_dataset
from fixtures.weights import require

from landlens.cli.main import cli
from landlens.retrieval.archive import Archive

ARCH = "landlens-test-clip-words"
CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def clip_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require("open_clip_torch", why="open_clip (pip install 'landlens[clip]')")
    import open_clip

    root = tmp_path_factory.mktemp("clip_words")
    (root / "configs").mkdir()
    (root / "configs" / f"{ARCH}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(3)
    model = open_clip.create_model(ARCH, pretrained=None, pretrained_hf=False).eval()
    ckpt = root / "tiny-clip.pt"
    torch.save(model.state_dict(), ckpt)
    data = make_folder_dataset(root / "data", ["beach", "forest", "river"], per_class=4, size=48)
    arch = root / "arch"
    Archive.build(data, arch, backbone=f"openclip:{ARCH}", weights=str(ckpt), rerank=None, cache_dir=root / "cache", progress=False)
    return {"root": root, "model": model, "ckpt": ckpt, "data": data, "arch": arch, "open_clip": open_clip}


def test_clip_identity_alignment_ranks_as_open_clip(clip_world: dict) -> None:
    w = clip_world
    al = w["root"] / "clip.safetensors"
    res = CliRunner().invoke(cli, ["retrieval", "align", str(w["data"]), "--clip", "-b", f"openclip:{ARCH}",
                                   "--weights", str(w["ckpt"]), "-o", str(al)])
    assert res.exit_code == 0, res.output
    assert "identity alignment" in res.output
    res = CliRunner().invoke(cli, ["index", "text", str(w["arch"]), str(al)])
    assert res.exit_code == 0, res.output
    archive = Archive.open(w["arch"])
    sentence = "a river with green banks"
    with torch.no_grad():
        t = w["model"].encode_text(w["open_clip"].get_tokenizer(ARCH)([sentence]))[0].numpy().astype(np.float64)
    t /= np.linalg.norm(t)
    v = np.asarray([archive.vector(r.id) for r in archive.records()], np.float64)  # encode_image of each image
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    s = v @ t
    want = [archive.records()[i].id for i in np.lexsort((np.arange(len(s)), -s))][:5]
    hits = archive.search_text(sentence, 5)
    assert [h.record.id for h in hits] == want
    np.testing.assert_allclose([h.score for h in hits], np.sort(s)[::-1][:5], atol=1e-5)


def test_clip_mode_refuses_captions_and_mismatched_towers(clip_world: dict) -> None:
    w = clip_world
    res = CliRunner().invoke(cli, ["retrieval", "align", str(w["data"]), "--clip", "-b", f"openclip:{ARCH}",
                                   "--weights", str(w["ckpt"]), "-c", "x.json", "-o", str(w["root"] / "x.safetensors")])
    assert res.exit_code == 2 and "no --captions" in res.output
    res = CliRunner().invoke(cli, ["retrieval", "align", str(w["data"]), "-b", "lbp_rgb", "-o", "x.safetensors"])
    assert res.exit_code == 2 and "give --captions FILE" in res.output
