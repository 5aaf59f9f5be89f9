"""File digests and their per-process cache."""

from __future__ import annotations

import hashlib

from landlens import hashing


def test_digests_match_hashlib(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    assert hashing.file_digest(f) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert hashing.file_digest(f, "md5") == hashlib.md5(b"x" * 3_000_000).hexdigest()


def test_cache_is_per_path_mtime_and_size(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    calls = []
    real = hashing.file_digest

    def counting(path, algorithm="sha256"):
        calls.append(path)
        return real(path, algorithm)

    monkeypatch.setattr(hashing, "file_digest", counting)
    assert hashing.cached_file_digest(f) == hashing.cached_file_digest(f) == hashlib.sha256(b"abc").hexdigest()
    assert len(calls) == 1
    f.write_bytes(b"abcd")  # a new size and mtime: hashed again
    assert hashing.cached_file_digest(f) == hashlib.sha256(b"abcd").hexdigest() and len(calls) == 2
