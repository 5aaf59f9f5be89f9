"""What the fault probe of issue #17 found in the archive and its CLI, each reproduced.

* a reader that read ``CURRENT`` just before a writer committed lost its generation to the
  writer's clean-up ("generation ... is unreadable");
* an upload stored by an add that was killed before its commit stayed forever;
* ``index add`` called a symlink loop, a FIFO or ``/dev/zero`` "no such file";
* a newline in a file name broke ``index list``;
* the CLI stored class names the API refuses;
* ``index add`` and ``search`` had no ``--max-pixels``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import landlens.retrieval.generations as generations
from fixtures.archives import archive_copy, template_archive
from fixtures.make_datasets import class_image, write_image
from landlens.cli.main import cli
from landlens.errors import ImageReadError
from landlens.retrieval.archive import Archive
from landlens.retrieval.generations import CURRENT, ArchiveError, validate_class_name

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock, FIFOs and SIGKILL are POSIX")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return template_archive(tmp_path_factory, "hard", ["beach", "forest"], per_class=3, size=40)


@pytest.fixture()
def arch(built: Path, tmp_path: Path) -> Archive:
    return archive_copy(built, tmp_path)


def _image(path: Path, k: int) -> Path:
    write_image(path, class_image(2, k, (40, 40)))
    return path


def test_a_reader_that_read_current_before_a_commit_still_loads(arch: Archive, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader reads CURRENT, then (forced here) waits until a writer has committed the next
    generation and finished, before loading the one it read. Without the readers' lock the
    writer's clean-up deleted that generation first."""
    original = generations.load_generation
    directory = arch.directory
    state: dict[str, object] = {}

    def slow_load(d: Path, name: str):  # noqa: ANN202
        if threading.current_thread().name == "reader":
            deadline = time.monotonic() + 20
            while (d / CURRENT).read_text().strip() == name and time.monotonic() < deadline:
                time.sleep(0.01)
            state["current_moved"] = (d / CURRENT).read_text().strip() != name
            time.sleep(0.5)  # the writer's clean-up runs now, unless it waits for us
        return original(d, name)

    monkeypatch.setattr(generations, "load_generation", slow_load)

    def read() -> None:
        try:
            state["opened"] = Archive.open(directory)
        except Exception as exc:  # noqa: BLE001
            state["error"] = exc

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    time.sleep(0.2)  # the reader has read CURRENT (generation 1)
    writer = Archive.open(directory)
    writer.add([_image(tmp_path / "lake.png", 0)], ["lake"])
    reader.join(30)
    assert state.get("current_moved") is True
    assert "error" not in state, state.get("error")
    opened = state["opened"]
    assert isinstance(opened, Archive) and opened.generation == 1 and len(opened) == 6
    assert Archive.open(directory).generation == 2
    assert not (directory / "gen-00000001").exists()  # collected once the reader was done


def test_concurrent_opens_never_fail_while_a_writer_commits(arch: Archive, tmp_path: Path) -> None:
    """The probe's case, bounded: readers open in a loop while another process adds images."""
    imgs = [_image(tmp_path / f"lake_{k}.png", k) for k in range(6)]
    script = ("import sys\nfrom landlens.retrieval.archive import Archive\n"
              "a = Archive.open(sys.argv[1])\n"
              "for p in sys.argv[2:]:\n    a.add([p], ['lake'])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(arch.directory), *map(str, imgs)])
    errors: list[str] = []
    opens = 0
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                Archive.open(arch.directory)
            except ArchiveError as exc:
                errors.append(str(exc))
            opens += 1
    finally:
        proc.wait(60)
    assert proc.returncode == 0
    assert not errors, f"{len(errors)} of {opens} opens failed: {errors[0]}"
    assert len(Archive.open(arch.directory)) == 12


_CRASHING_UPLOAD = """
import os, signal, sys
import landlens.retrieval.archive as archive
import landlens.retrieval.generations as generations

def crash(directory, name):
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the upload and the new generation, before the commit

generations.commit_generation = crash
archive.Archive.open(sys.argv[1]).add_upload(sys.argv[2], "lake")
"""


def test_an_upload_orphaned_by_a_crash_is_cleaned(arch: Archive, tmp_path: Path) -> None:
    img = _image(tmp_path / "up.png", 3)
    proc = subprocess.run([sys.executable, "-c", _CRASHING_UPLOAD, str(arch.directory), str(img)], timeout=120)
    assert proc.returncode == -9
    orphans = list((arch.directory / "uploads").iterdir())
    assert len(orphans) == 1 and orphans[0].suffix == ".png"  # stored, never committed
    reopened = Archive.open(arch.directory)
    assert reopened.generation == 1 and reopened.info()["uploads"] == 0  # not counted: no image uses it
    reopened.add([_image(tmp_path / "other.png", 4)], ["lake"])  # the next update's clean-up
    assert list((arch.directory / "uploads").iterdir()) == []
    record = reopened.add_upload(img, "lake")  # and the upload itself still works
    assert record is not None and reopened.info()["uploads"] == 1
    assert reopened.add_upload(img, "lake") is None  # same content: nothing new
    reopened.remove([record.id])
    assert list((arch.directory / "uploads").iterdir()) == []


def test_add_names_what_a_path_is(arch: Archive, tmp_path: Path) -> None:
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    cases = {loop: "symbolic link loop", fifo: "not a regular file: a named pipe (FIFO)",
             Path("/dev/zero"): "not a regular file: a character device",
             dangling: "broken symbolic link", tmp_path / "absent.png": "file not found"}
    for path, reason in cases.items():
        with pytest.raises(ImageReadError, match=re.escape(f"{path}: {reason}")):
            arch.add([path])
        res = CliRunner().invoke(cli, ["index", "add", str(arch.directory), str(path)])
        said = "no such file or folder" if reason == "file not found" else reason
        assert res.exit_code == 2 and f"{path}: {said}" in res.output, res.output
    assert len(Archive.open(arch.directory)) == 6


def test_index_list_keeps_one_image_per_line(arch: Archive, tmp_path: Path) -> None:
    odd = _image(tmp_path / "two\nlines.png", 5)
    arch.add([odd], ["lake"])
    res = CliRunner().invoke(cli, ["index", "list", str(arch.directory)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 7
    assert lines[-1].endswith("two\\nlines.png") and lines[-1].split("\t")[1] == "lake"
    listed = json.loads(CliRunner().invoke(cli, ["index", "list", str(arch.directory), "--json"]).output)
    assert listed[-1]["path"].endswith("two\nlines.png")  # JSON keeps the real name


@pytest.mark.parametrize("name", ["bad\nname", "tab\there", "bell\x07", "x" * 201, "nb\xa0sp"])
def test_class_names_are_checked_once_for_cli_and_api(arch: Archive, tmp_path: Path, name: str) -> None:
    with pytest.raises(ArchiveError, match="bad class name"):
        validate_class_name(name)
    res = CliRunner().invoke(cli, ["index", "add", str(arch.directory), str(_image(tmp_path / "a.png", 6)),
                                   "--class", name])
    assert res.exit_code == 2 and "bad class name" in res.output
    assert validate_class_name("  harbour  ") == "harbour" and validate_class_name(" ") is None
    assert len(Archive.open(arch.directory)) == 6


def test_max_pixels_for_index_add_and_search(arch: Archive, tmp_path: Path) -> None:
    img = _image(tmp_path / "big.png", 7)  # 40 x 40 = 1600 pixels
    runner = CliRunner()
    res = runner.invoke(cli, ["index", "add", str(arch.directory), str(img), "--max-pixels", "1000"])
    assert res.exit_code == 2 and "40x40 pixels exceeds the limit of 1000" in res.output, res.output
    assert len(Archive.open(arch.directory)) == 6
    res = runner.invoke(cli, ["index", "add", str(arch.directory), str(img), "--max-pixels", "1600"])
    assert res.exit_code == 0, res.output
    store = Archive.open(arch.directory).info()["feature_store"]
    index = tmp_path / "rows.index"
    assert runner.invoke(cli, ["retrieval", "index", store, "--out", str(index)]).exit_code == 0
    res = runner.invoke(cli, ["search", str(index), str(img), "-k", "3", "--max-pixels", "1000"])
    assert res.exit_code == 2 and "exceeds the limit of 1000" in res.output, res.output
    assert runner.invoke(cli, ["search", str(index), str(img), "-k", "3", "--max-pixels", "1600"]).exit_code == 0
