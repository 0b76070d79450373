"""atomic_write: readers see the old file or the whole new one, and nothing is left behind."""
import pytest

from harness.paths import atomic_write, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "sub" / "result.json", "old")
    assert target.read_text() == "old"

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_the_temporary_is_hidden_and_does_not_match_the_targets_pattern(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"x")

    atomic_write(tmp_path / "shard-00000.parquet", write)
    assert seen[0].name.startswith(".shard-00000.parquet.") and seen[0].suffix == ".tmp"
    assert seen[0].parent == tmp_path
