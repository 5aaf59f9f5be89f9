"""Crash safety of archive updates: `landlens index add` killed with SIGKILL mid-update."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.make_datasets import class_image, make_folder_dataset, write_image
from landlens.retrieval.archive import Archive

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock are POSIX")


@pytest.fixture()
def arch(tmp_path: Path) -> Archive:
    data = make_folder_dataset(tmp_path / "scenes", ["beach", "forest"], per_class=3, size=40)
    return Archive.build(data, tmp_path / "arch", backbone="lbp_rgb", rerank=None, progress=False)


# Fault injection from the test, not a hook in landlens: the child wraps the archive's commit
# step so that it announces itself and sleeps there (the parent kills it at that moment).
_PAUSED_ADD = """
import sys, time
import landlens.retrieval.generations as generations
from landlens.cli.main import main

commit = generations.commit_generation
pause = float(sys.argv.pop(1))

def paused(directory, name):
    print(f"generation {name} written, pausing before commit", file=sys.stderr, flush=True)
    time.sleep(pause)
    commit(directory, name)

generations.commit_generation = paused
sys.argv[0] = "landlens"
main()
"""


def _add_process(arch_dir: Path, image: Path, pause: float | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["index", "add", str(arch_dir), str(image), "--class", "lake"]
    cmd = ([sys.executable, "-c", _PAUSED_ADD, str(pause), *args] if pause is not None
           else [sys.executable, "-m", "landlens.cli.main", *args])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _snapshot(arch: Archive) -> list[tuple[int, str, str | None]]:
    return [(r.id, r.sha256, r.class_name) for r in arch.records()]


def test_kill_after_the_new_generation_is_written_keeps_the_old_archive(arch: Archive, tmp_path: Path) -> None:
    before = _snapshot(arch)
    img = tmp_path / "lake.png"
    write_image(img, class_image(5, 0, (40, 40)))
    proc = _add_process(arch.directory, img, pause=120)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "pausing before commit" not in line:  # the new generation is complete on disk
            assert time.monotonic() < deadline, "the add never reached its commit point"
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"add exited early: {proc.stdout.read()}"
        assert (arch.directory / "gen-00000002" / "generation.json").is_file()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reopened = Archive.open(arch.directory)
    assert reopened.generation == 1 and _snapshot(reopened) == before
    assert reopened.search_id(before[0][0], 3)  # loadable and searchable
    # the next update goes through and clears the orphaned generation
    new = reopened.add([img], ["lake"])
    assert [r.id for r in new] == [6] and reopened.generation == 2
    assert Archive.open(arch.directory).class_counts() == {"beach": 3, "forest": 3, "lake": 1}


def test_kills_at_random_moments_always_leave_a_loadable_archive(arch: Archive, tmp_path: Path) -> None:
    rng = random.Random(0)
    for k in range(4):
        current = Archive.open(arch.directory)
        before = _snapshot(current)
        img = tmp_path / f"lake_{k}.png"
        write_image(img, class_image(5, k, (40, 40)))
        proc = _add_process(arch.directory, img, pause=None)
        time.sleep(rng.uniform(0.2, 6.0))  # covers start-up, embedding, writing and committing
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        after = Archive.open(arch.directory)
        snap = _snapshot(after)
        assert snap == before or (snap[:-1] == before and snap[-1][2] == "lake"), (k, proc.returncode)
        assert after.search_id(snap[0][0], 2)
