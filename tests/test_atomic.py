"""Atomic writes: a crash mid-write leaves the previous file intact and no temp files."""

import os

import pytest

from medgen.atomic import atomic_write_json, atomic_write_text


def test_replace_is_all_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"round": 1})

    def crash(src, dst):
        raise OSError("simulated power loss")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_json(target, {"round": 2})
    monkeypatch.undo()
    assert target.read_text().strip().endswith("}")
    assert '"round": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_mode_is_applied_before_the_file_appears(tmp_path):
    path = atomic_write_text(tmp_path / "key.pem", "secret", mode=0o600)
    assert (path.stat().st_mode & 0o777) == 0o600
