"""Segment archives: updates write only their batch, searches merge segments and skip deleted
images exactly as a brute force over the live images does, the compaction policy and
`landlens index compact`, format-1 archives, and readers while a compaction commits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fixtures.archives import archive_copy, template_archive
from fixtures.make_datasets import class_image, write_image
from landlens.cli.main import cli
from landlens.retrieval.archive import Archive
from landlens.retrieval.index import SearchIndex
from landlens.retrieval.records import ImageRecord
from landlens.retrieval.segments import RowStack, Segment, SegmentIndex, live_rows, plan_merges

CLASSES = ["beach", "forest", "river"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return template_archive(tmp_path_factory, "seg", CLASSES, per_class=4, size=48)


@pytest.fixture()
def arch(built: Path, tmp_path: Path) -> Archive:
    return archive_copy(built, tmp_path)


def _images(folder: Path, n: int, cls: int = 1, start: int = 0) -> list[Path]:
    out = []
    for k in range(start, start + n):
        p = folder / f"new_{cls}_{k}.png"
        write_image(p, class_image(cls, 100 + k, (44, 44)))
        out.append(p)
    return out


def _brute_ids(arch: Archive, id: int) -> list[int]:
    """Ids of the other live images by decreasing cosine to image ``id`` (float64 numpy, ties by
    row), from the archive's stored vectors: what any correct search must return."""
    recs = arch.records()
    v = np.asarray([arch.vector(r.id) for r in recs], np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = v[[r.id for r in recs].index(id)]
    s = v @ q
    order = [i for i in np.lexsort((np.arange(len(s)), -s)) if recs[i].id != id]
    return [recs[i].id for i in order]


def _check_every_search(arch: Archive, k: int = 5) -> None:
    for r in arch.records():
        want = _brute_ids(arch, r.id)[:k]
        got = [h.record.id for h in arch.search_id(r.id, k)]
        assert got == want, (r.id, got, want)


def _doc(arch: Archive) -> dict:
    return json.loads((arch.directory / f"gen-{arch.generation:08d}" / "generation.json").read_text())


def _files(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------- the pieces


def test_plan_merges_hand_worked_cases() -> None:
    assert plan_merges([1000], [0]) == []
    assert plan_merges([1000] + [5] * 9, [0] * 10) == []  # nine small ones: not yet
    assert plan_merges([1000] + [5] * 10, [0] * 11) == [list(range(1, 11))]
    assert plan_merges([1000, 10, 20, 26, 30], [0] * 5, fanout=3) == [[1, 2, 3]]  # 9..26 is tier 2, 30 tier 3
    assert plan_merges([100, 10], [26, 0]) == [[0]]  # more than a quarter deleted: rewritten alone
    assert plan_merges([100, 10], [25, 0]) == []  # exactly a quarter: kept
    assert plan_merges([10, 3], [10, 0]) == [[0]]  # wholly deleted
    # fanout 2: tiers 4 -> 2, 9 -> 3, 10 -> 3, 99 -> 6, 100 -> 6
    assert plan_merges([4, 9, 10, 99, 100], [0] * 5, fanout=2) == [[1, 2], [3, 4]]
    assert plan_merges([999, 1000], [0, 0], fanout=1000) == []  # 999 is tier 0, 1000 tier 1 (no float log)


def test_plan_merges_tier_boundary_is_exact() -> None:
    assert plan_merges([1000] * 10, [0] * 10) == [list(range(10))]
    assert plan_merges([1000] * 9 + [999], [0] * 10) == []


def test_row_stack_equals_numpy_concatenation() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 4)).astype(np.float32) for n in (5, 1, 7)]
    live = [None, np.array([], dtype=np.int64), np.array([0, 3, 6])]
    want = np.concatenate([parts[0], parts[2][[0, 3, 6]]])
    stack = RowStack(parts, live)
    assert stack.shape == (8, 4) and len(stack) == 8
    np.testing.assert_array_equal(stack[6], want[6])
    np.testing.assert_array_equal(stack[-1], want[-1])
    np.testing.assert_array_equal(stack[[7, 0, 5, 5]], want[[7, 0, 5, 5]])
    np.testing.assert_array_equal(stack[2:7], want[2:7])
    np.testing.assert_array_equal(np.asarray(stack), want)
    with pytest.raises(IndexError):
        stack[8]


def _segment(path: str, ids: range, x: np.ndarray) -> Segment:
    index = SearchIndex("exact").fit(x)
    recs = [ImageRecord(i, f"/x/{i}.png", f"{i}.png", None, 1, 1, f"{i:064x}", 1, "") for i in ids]
    return Segment(path, index, x, recs, {})


def test_segment_index_equals_brute_force_over_the_live_rows() -> None:
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 8)).astype(np.float32) for n in (40, 3, 25)]
    segs = [_segment("a", range(0, 40), xs[0]), _segment("b", range(40, 43), xs[1]),
            _segment("c", range(43, 68), xs[2])]
    deleted = frozenset({0, 5, 39, 41, 44, 60})
    live = [live_rows(s, deleted) for s in segs]
    stack = RowStack([s.vectors for s in segs], live)
    index = SegmentIndex(segs, live, stack.starts)
    db = np.asarray(stack, np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    ids = np.concatenate([s.ids for s in segs])
    live_ids = ids[~np.isin(ids, list(deleted))]
    assert index.ntotal == len(db) == len(live_ids) == 62
    q = rng.normal(size=(6, 8)).astype(np.float32)
    for k in (1, 10, 62):
        dist, rows = index.search(q, k)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        for qi in range(len(q)):
            cos = db @ qn[qi]
            want = np.lexsort((np.arange(len(cos)), -cos))[:k]
            np.testing.assert_array_equal(rows[qi], want)
            np.testing.assert_allclose(dist[qi], 1 - cos[want], atol=1e-5)
    assert not set(live_ids[rows.ravel()]) & deleted


# ---------------------------------------------------------------------------- the archive


def test_an_add_writes_a_segment_of_its_batch_only(arch: Archive, tmp_path: Path) -> None:
    d = arch.directory
    base = _files(d / "segments" / "seg-00000001")
    new = arch.add(_images(tmp_path, 2), ["lake", "lake"])
    assert _files(d / "segments" / "seg-00000001") == base  # not one byte of the old segment rewritten
    seg = d / "segments" / "seg-00000002"
    assert np.load(seg / "vectors.npy").shape[0] == 2
    assert sorted(p.name for p in (d / "gen-00000002").iterdir()) == ["generation.json"]  # no deletion set yet
    doc = _doc(arch)
    assert doc["format"] == 2 and doc["images"] == 14 and doc["deleted"] == 0
    assert doc["segments"] == [{"path": "segments/seg-00000001", "images": 12},
                               {"path": "segments/seg-00000002", "images": 2}]
    for r in new:  # the new vectors are the images' own embeddings, found first
        np.testing.assert_allclose(arch.vector(r.id), arch.embed([arch.load_query(r.path)])[0], atol=1e-6)
        assert arch.search(r.path, 1)[0].record.id == r.id
    again = Archive.open(d)
    assert len(again) == 14 and again.info()["segments"] == 2
    _check_every_search(again, k=13)


def test_searches_over_segments_and_deletions_equal_a_brute_force(arch: Archive, tmp_path: Path) -> None:
    for k in range(3):
        arch.add(_images(tmp_path, 2, cls=k % 3, start=10 * k), ["lake"] * 2)
    arch.remove([3, 13])  # one from the first segment, one from a two-image segment (then rewritten)
    assert len(arch) == 16
    info = arch.info()
    assert info["deleted"] == 1 and info["segments"] == 4
    assert sorted(p.name for p in (arch.directory / f"gen-{arch.generation:08d}").iterdir()) == [
        "deleted.npy", "generation.json"]
    _check_every_search(arch, k=6)
    again = Archive.open(arch.directory)
    assert [r.id for r in again.records()] == [r.id for r in arch.records()]
    _check_every_search(again, k=15)  # every other image, ranked as the brute force ranks them
    hits = again.search_id(0, 15, class_name="lake")
    assert [h.record.id for h in hits] == [i for i in _brute_ids(again, 0) if again.record(i).class_name == "lake"]
    with pytest.raises(Exception, match="no image with id 3"):
        again.record(3)


def test_ten_small_segments_are_merged_in_the_same_update(arch: Archive, tmp_path: Path) -> None:
    imgs = _images(tmp_path, 10)
    for k, img in enumerate(imgs[:9]):
        arch.add([img], ["lake"])
        assert arch.generation == k + 2 and arch.info()["segments"] == k + 2
    arch.add([imgs[9]], ["lake"])  # the tenth one-image segment: the ten are merged into one
    assert arch.generation == 11
    doc = _doc(arch)
    assert [s["images"] for s in doc["segments"]] == [12, 10]
    assert doc["segments"][1]["path"] == "segments/seg-00000011.1"
    assert sorted(p.name for p in (arch.directory / "segments").iterdir()) == ["seg-00000001", "seg-00000011.1"]
    _check_every_search(Archive.open(arch.directory), k=21)


def test_a_segment_a_quarter_deleted_is_rewritten(arch: Archive) -> None:
    arch.remove([0, 1, 2])  # exactly a quarter: kept, with a deletion set
    assert arch.info()["deleted"] == 3 and _doc(arch)["segments"][0]["path"] == "segments/seg-00000001"
    arch.remove([4])
    doc = _doc(arch)
    assert doc["deleted"] == 0 and doc["segments"] == [{"path": "segments/seg-00000003.1", "images": 8}]
    assert not (arch.directory / "segments" / "seg-00000001").exists()
    assert sorted(r.id for r in Archive.open(arch.directory).records()) == [3, 5, 6, 7, 8, 9, 10, 11]
    _check_every_search(arch, k=7)


def test_compact_merges_everything_and_keeps_every_result(arch: Archive, tmp_path: Path) -> None:
    for k in range(3):
        arch.add(_images(tmp_path, 1, start=k), ["lake"])
    arch.remove([5])
    before = {r.id: [h.record.id for h in arch.search_id(r.id, 8)] for r in arch.records()}
    res = CliRunner().invoke(cli, ["index", "compact", str(arch.directory), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc == {"compacted": True, "segments_before": 4, "deleted_before": 1, "generation": 6, "images": 14}
    again = Archive.open(arch.directory)
    assert again.info()["segments"] == 1 and again.info()["deleted"] == 0 and again.factory == "Flat"
    assert {r.id: [h.record.id for h in again.search_id(r.id, 8)] for r in again.records()} == before
    assert sorted(p.name for p in (arch.directory / "segments").iterdir()) == ["seg-00000006"]
    res = CliRunner().invoke(cli, ["index", "compact", str(arch.directory)])
    assert res.exit_code == 0 and "nothing to do" in res.output


def test_compact_retrains_the_archive_index_kind(built: Path, tmp_path: Path) -> None:
    data = Path(Archive.open(built).info()["data_root"])
    arch = Archive.build(data, tmp_path / "ivf", backbone="lbp_rgb", rerank=None, index_factory="IVF2,Flat",
                         progress=False)
    arch.add(_images(tmp_path, 3), ["lake"] * 3)
    assert arch.info()["segments"] == 2 and arch.factory == "IVF2,Flat"  # the small segment is exact
    arch.compact()
    assert arch.info()["segments"] == 1 and arch.factory == "IVF2,Flat"
    arch.index.nprobe = 2  # both lists: exact
    _check_every_search(arch, k=5)


def _to_format_1(d: Path) -> None:
    """Rewrite a one-segment archive in the layout of landlens 0.2-0.3: one folder per generation."""
    doc = json.loads((d / "gen-00000001" / "generation.json").read_text())
    seg = d / "segments" / "seg-00000001"
    for p in seg.iterdir():
        if p.name != "segment.json":
            shutil.move(str(p), d / "gen-00000001" / p.name)
    shutil.rmtree(d / "segments")
    old = {k: doc[k] for k in ("generation", "parent", "images", "next_id", "written", "meta")}
    (d / "gen-00000001" / "generation.json").write_text(json.dumps({**old, "format": 1}))


def test_a_format_1_archive_is_read_updated_and_compacted(arch: Archive, tmp_path: Path) -> None:
    d = arch.directory
    want = {r.id: [h.record.id for h in arch.search_id(r.id, 5)] for r in arch.records()}
    _to_format_1(d)
    old = Archive.open(d)
    assert len(old) == 12 and old.info()["segments"] == 1
    assert {r.id: [h.record.id for h in old.search_id(r.id, 5)] for r in old.records()} == want
    old.add(_images(tmp_path, 1), ["lake"])
    assert [s["path"] for s in _doc(old)["segments"]] == ["gen-00000001", "segments/seg-00000002"]
    assert (d / "gen-00000001" / "vectors.npy").is_file()  # still listed: kept by the clean-up
    old.remove([12])  # the added image's segment is then wholly deleted and dropped
    assert [s["path"] for s in _doc(old)["segments"]] == ["gen-00000001"]
    assert old.compact()
    assert not (d / "gen-00000001").exists() and [s["path"] for s in _doc(old)["segments"]] == ["segments/seg-00000004"]
    assert {r.id: [h.record.id for h in old.search_id(r.id, 5)] for r in Archive.open(d).records()} == want


# Fault injection from the test: the child's compaction pauses before and after its commit, so
# readers open the archive before, during and after it, and while its clean-up deletes segments.
_SLOW_COMPACT = """
import sys, time
import landlens.retrieval.generations as generations
from landlens.retrieval.archive import Archive

commit = generations.commit_generation

def slow(directory, name):
    print("committing", file=sys.stderr, flush=True)
    time.sleep(1.0)
    commit(directory, name)
    time.sleep(1.0)

generations.commit_generation = slow
Archive.open(sys.argv[1]).compact()
print("compacted", file=sys.stderr, flush=True)
"""


def test_readers_never_fail_while_a_compaction_commits(arch: Archive, tmp_path: Path) -> None:
    for k in range(4):
        arch.add(_images(tmp_path, 1, start=k), ["lake"])
    arch.remove([2])
    want = {r.id: [h.record.id for h in arch.search_id(r.id, 6)] for r in arch.records()}
    held = Archive.open(arch.directory)  # loaded before: its segments are deleted under it
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_COMPACT, str(arch.directory)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    generations: set[int] = set()
    opens = 0
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                a = Archive.open(arch.directory)
                generations.add(a.generation)
                got = {r.id: [h.record.id for h in a.search_id(r.id, 6)] for r in a.records()[:4]}
                assert got == {i: want[i] for i in got}
                opens += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stderr.read()
    assert proc.returncode == 0 and "compacted" in out, out
    assert not errors, errors[:3]
    assert opens >= 3 and generations == {6, 7}, (opens, generations)  # before and after the commit
    assert Archive.open(arch.directory).info()["segments"] == 1
    assert not (arch.directory / "segments" / "seg-00000001").exists()  # collected
    assert {r.id: [h.record.id for h in held.search_id(r.id, 6)] for r in held.records()} == want


def test_a_writer_in_another_process_is_picked_up_by_reload(arch: Archive, tmp_path: Path) -> None:
    other = Archive.open(arch.directory)
    other.add(_images(tmp_path, 2), ["lake", "lake"])
    first = arch._state.segments[0]
    assert arch.reload() and len(arch) == 14
    assert arch._state.segments[0] is first  # the segment already loaded is not read again
    _check_every_search(arch, k=13)


def test_concurrent_adders_serialise(arch: Archive, tmp_path: Path) -> None:
    imgs = _images(tmp_path, 8)
    errors: list[BaseException] = []

    def add(chunk: list[Path]) -> None:
        try:
            a = Archive.open(arch.directory)
            for p in chunk:
                a.add([p], ["lake"])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(imgs[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    again = Archive.open(arch.directory)
    assert len(again) == 20 and again.generation == 9 and sorted(r.id for r in again.records()) == list(range(20))
    _check_every_search(again, k=19)
