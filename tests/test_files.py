"""atomic_write: the final file is the old one or the new one, never a part, and no temporary file is left."""

from __future__ import annotations

import pytest

from pipelines.files import atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "sub" / "metrics.json"
    atomic_write(final, lambda tmp: tmp.write_text("old"))

    def half_then_crash(tmp):
        tmp.write_text("half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(final, half_then_crash)
    assert final.read_text() == "old"
    assert [p.name for p in final.parent.iterdir()] == ["metrics.json"]

    assert atomic_write(final, lambda tmp: tmp.write_text("new")) == final
    assert final.read_text() == "new" and len(list(final.parent.iterdir())) == 1


def test_the_temporary_is_hidden_beside_the_final_file(tmp_path):
    seen = []
    atomic_write(tmp_path / "part-1.parquet", lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".part-1.parquet.")
    assert not list(tmp_path.glob("part-*.parquet.*"))
