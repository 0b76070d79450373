"""atomic_write (readers see the old file or the whole new one, nothing left behind) and
where results go (the cache root; locations that outlive a Ray job)."""
import os

import pytest

from harness.data.cache import atomic_write, write_text_atomic


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


# -- locations that outlive a Ray job -----------------------------------------------------------
def test_defaults_inside_a_ray_job_are_refused_naming_what_to_set(tmp_path, monkeypatch):
    from harness.data.cache import LocationError, check_persistent
    monkeypatch.chdir(tmp_path)                      # as Ray's temporary copy of the project
    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    check_persistent(f"sqlite:///{tmp_path / 'mlflow.db'}")      # not a job: the defaults are fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(LocationError) as err:
        check_persistent(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "storage.uri=" in str(err.value) and "tracking.uri=" in str(err.value)
    monkeypatch.setenv("HARNESS_CACHE_DIR", "relative/cache")   # still inside the copy
    with pytest.raises(LocationError, match="storage.uri="):
        check_persistent("http://127.0.0.1:5000")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path.parent / "lasting"))
    check_persistent("http://127.0.0.1:5000")
    with pytest.raises(LocationError, match="tracking.uri=") as err:
        check_persistent("sqlite:///mlflow.db")
    assert "storage.uri=" not in str(err.value)


def test_a_local_storage_holds_the_cache_unless_one_is_named(tmp_path, monkeypatch):
    from harness.data.cache import cache_dir, use_storage
    monkeypatch.delenv("HARNESS_CACHE_DIR", raising=False)
    use_storage("s3://bucket/results")                  # remote results: the cache stays local
    assert "HARNESS_CACHE_DIR" not in os.environ
    use_storage(tmp_path / "spec")
    assert cache_dir() == tmp_path / "spec" and os.environ["HARNESS_CACHE_DIR"] == str(tmp_path / "spec")
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "env"))
    use_storage(tmp_path / "other")                     # a named cache wins
    assert cache_dir() == tmp_path / "env"
    use_storage("s3://bucket/results", tmp_path / "spec-cache")  # the spec's cache wins
    assert cache_dir() == tmp_path / "spec-cache"


def test_results_written_atomically_get_the_permissions_open_would_give(tmp_path):
    """mkstemp makes 0600 files; a result renamed into place (and MLflow's copy of it) must
    be readable as any file the user writes: 0666 less the umask."""
    import os
    import stat

    from harness.data.storage import Storage
    old = os.umask(0o027)
    try:
        text = write_text_atomic(tmp_path / "report.html", "<html></html>")
        store = Storage(tmp_path / "store")
        rows = store.write_bytes(store.path("shards", "rows.parquet"), b"rows")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(text).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(rows).st_mode) == 0o640
