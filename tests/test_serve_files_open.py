"""pxe.serve.files.open_file: the openat2(RESOLVE_BENEATH) way and the portable realpath way give
the same answers for every kind of name (in-root links, escapes, hidden, private, FIFO)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pxe.serve import files

pytestmark = pytest.mark.unit


def _tree(tmp_path: Path) -> str:
    root = tmp_path / "root"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "k").write_bytes(b"kernel")
    (root / "blobs" / "k").chmod(0o644)
    (root / "private").write_bytes(b"x")
    (root / "private").chmod(0o600)
    (tmp_path / "secret").write_bytes(b"secret")
    (tmp_path / "secret").chmod(0o644)
    (root / "rel-inside").symlink_to("blobs/k")
    (root / "abs-inside").symlink_to(root / "blobs" / "k")
    (root / "abs-out").symlink_to(tmp_path / "secret")
    (root / "rel-out").symlink_to("../secret")
    (root / "blobs" / "up").symlink_to("..")  # a directory link that stays inside
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo", 0o644)
    return files.root_of(root)


CASES = {
    "blobs/k": b"kernel", "/blobs/k": b"kernel", "rel-inside": b"kernel",
    "abs-inside": b"kernel", "blobs/up/blobs/k": b"kernel", "blobs\\k": b"kernel",
    "abs-out": files.Refused, "rel-out": files.Refused, "../secret": files.Refused,
    "blobs/../../secret": files.Refused, "private": files.Refused, "a\x01b": files.Refused,
    "dangling": files.Missing, "fifo": files.Missing, "blobs": files.Missing,
    "nothing/here": files.Missing, "blobs/k/more": files.Missing, ".hidden": files.Missing,
    "": files.Missing,
}


def _outcome(root: str, name: str) -> object:
    try:
        fd, st, _ = files.open_file(root, name)
    except (files.Refused, files.Missing) as exc:
        return type(exc)
    try:
        return os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("way", ["openat2", "realpath"])
def test_both_ways_give_the_same_answers(tmp_path, monkeypatch, way):
    root = _tree(tmp_path)
    if way == "realpath":
        monkeypatch.setattr(files, "_libc", [None])
    else:
        _outcome(root, "blobs/k")
        if files._libc[0] is None:
            pytest.fail("openat2 is not available on this kernel")
    got = {name: _outcome(root, name) for name in CASES}
    assert got == CASES


def test_openat2_answers_the_common_case_alone(tmp_path, monkeypatch):
    """A plain file opens without realpath (the cost this way exists to save)."""
    root = _tree(tmp_path)

    def no_realpath(*_a: object, **_k: object) -> str:
        raise AssertionError("realpath used")

    monkeypatch.setattr(files.os.path, "realpath", no_realpath)
    assert _outcome(root, "blobs/k") == b"kernel"
    assert _outcome(root, "rel-inside") == b"kernel"
    assert _outcome(root, "nothing/here") is files.Missing


def test_a_root_replaced_under_its_name_is_served_soon(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    assert _outcome(root, "blobs/k") == b"kernel"
    os.rename(root, root + ".old")
    os.makedirs(root + "/blobs")
    Path(root, "blobs", "k").write_bytes(b"new kernel")
    Path(root, "blobs", "k").chmod(0o644)
    monkeypatch.setattr(files, "ROOT_FD_AGE", 0.0)  # (normally: within a second)
    assert _outcome(root, "blobs/k") == b"new kernel"
