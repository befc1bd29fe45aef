"""Atomic writes keep the old file whole when writing fails."""

import os

import pytest

from jaxnoise.io import write_text_atomic


def test_write_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["b.txt"]  # no temporary file left behind

def test_failed_write_keeps_old_content(tmp_path):
    path = tmp_path / "b.txt"
    write_text_atomic(path, "old")

    with pytest.raises(TypeError):
        write_text_atomic(path, 123)  # not text: fails inside the write
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["b.txt"]
