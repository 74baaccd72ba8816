"""The test suite's own helpers (tests/helpers.py): missing shared data or test dependencies skip on a user's machine,
fail under CI."""
from __future__ import annotations

import pytest

from helpers import import_or_skip, require


def test_missing_shared_data_skips_locally_and_fails_under_ci(tmp_path, monkeypatch):
    absent = tmp_path / "golden" / "adaface_ir50_golden.npz"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="golden vectors not found at .*adaface_ir50_golden.npz"):
        require(absent, "golden vectors")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(BaseException, match="golden vectors not found .*CI needs it") as caught:  # a skip too
        require(absent, "golden vectors")
    assert caught.type is pytest.fail.Exception
    assert require(tmp_path, "a directory that exists") == tmp_path


def test_missing_test_dependency_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        import_or_skip("no_such_test_dependency")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(BaseException) as caught:  # a skip too
        import_or_skip("no_such_test_dependency")
    assert caught.type is ModuleNotFoundError
