"""The run file and checkpoints: layout read back with plain h5py, resume, corruption, the lock."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from fdcr_mpi.errors import UserError
from fdcr_mpi.store import (
    CheckpointWarning,
    RunFile,
    RunLock,
    format_summary,
    list_checkpoints,
    load_latest_checkpoint,
    read_rounds,
    read_summary,
    write_checkpoint,
)
from fdcr_mpi.store import checkpoint as ckpt_mod
from fdcr_mpi.store import writer as store

REPO = Path(__file__).resolve().parents[1]
K = 4
HASH = "a1b2c3"


def make_run(path: Path, config_hash: str = HASH) -> RunFile:
    partition = [np.arange(0, 3), np.arange(3, 8), np.array([], dtype=np.int64), np.arange(8, 10)]
    return RunFile.create(
        path, config_yaml="rounds: 5\nseed: 1\n", config_hash=config_hash, version="0.1.0",
        num_clients=K, sizes=np.array([3, 5, 0, 2]), malicious=np.array([True, False, False, True]),
        partition=partition, num_params=12,
    )


def row(t: int, **more: object) -> dict:
    base = {"round": t, "A": 50.0 + t, "R": 10.0 - t, "V": 40.0 + 2 * t, "tpr": 1.0, "fpr": 0.0,
            "alpha": np.full(K, 0.25), "removed": np.array([t % 2 == 0, False, False, True]),
            "num_removed": 2}
    base.update(more)
    return base


def run_py(code: str, *args: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", textwrap.dedent(code), *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------- run file


def test_create_append_layout_read_with_plain_h5py(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        for t in range(3):
            run.append_round(row(t))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]  # no temp file left

    with h5py.File(path, "r") as f:
        assert f.attrs["config"] == "rounds: 5\nseed: 1\n"
        assert f.attrs["config_hash"] == HASH and f.attrs["version"] == "0.1.0"
        assert f.attrs["status"] == "running" and f.attrs["created"].startswith("20")
        assert f["clients/sizes"][()].tolist() == [3, 5, 0, 2]
        assert f["clients/malicious"].dtype == bool
        assert f["clients/malicious"][()].tolist() == [True, False, False, True]
        flat, off = f["clients/partition_indices"][()], f["clients/partition_offsets"][()]
        assert flat.dtype == np.int64 and off.tolist() == [0, 3, 8, 8, 10]
        assert flat[off[1]:off[2]].tolist() == [3, 4, 5, 6, 7]
        rounds = f["rounds"]
        assert rounds["round"].dtype == np.int64 and rounds["round"][()].tolist() == [0, 1, 2]
        assert rounds["A"].dtype == np.float64 and rounds["A"].maxshape == (None,)
        assert rounds["alpha"].shape == (3, K) and rounds["alpha"].maxshape == (None, K)
        assert rounds["removed"].dtype == bool and rounds["removed"][0].tolist() == [True, False, False, True]
        assert rounds["num_removed"].dtype == np.int64
        assert rounds["A"][()].tolist() == [50.0, 51.0, 52.0]


def test_rows_are_on_disk_while_the_run_is_open(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    run = make_run(path)
    run.append_round(row(0))
    run.append_round(row(1))
    # a user's notebook (another process, plain h5py with its default file locking)
    proc = run_py("import h5py, sys; print(h5py.File(sys.argv[1], 'r')['rounds/round'][()].tolist())", str(path))
    assert proc.returncode == 0 and proc.stdout.strip() == "[0, 1]", proc.stderr
    assert read_rounds(path)["A"].tolist() == [50.0, 51.0]
    run.close()


def test_rounds_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    make_run(path).close()
    code = """
        import os, signal, sys
        from fdcr_mpi.store import RunFile
        run = RunFile.open(sys.argv[1], "a1b2c3")
        for t in range(3):
            run.append_round({"round": t, "A": float(t)})
        os.kill(os.getpid(), signal.SIGKILL)
    """
    proc = run_py(code, str(path))
    assert proc.returncode == -signal.SIGKILL
    with h5py.File(path, "r") as f:
        assert f["rounds/A"][()].tolist() == [0.0, 1.0, 2.0]
    with RunFile.open(path, HASH) as run:
        assert run.rounds_done() == 3


def test_pandas_reads_rounds(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        for t in range(4):
            run.append_round(row(t))
    with h5py.File(path, "r") as f:
        cols = {k: v[()] for k, v in f["rounds"].items()}
    df = pd.DataFrame({k: v for k, v in cols.items() if v.ndim == 1}).set_index("round")
    assert df.loc[3, "A"] == 53.0 and len(df) == 4
    alpha = pd.DataFrame(cols["alpha"], index=cols["round"])
    assert alpha.shape == (4, K)


def test_late_and_missing_keys_are_filled(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        run.append_round({"round": 0, "A": 1.0})
        run.append_round({"round": 1, "A": 2.0, "asr": 0.5, "count": 7, "flag": True, "vec": np.ones(K)})
        run.append_round({"round": 2})  # every other column missing this round
        run.append_round({"A": 3.0})  # round filled in as previous + 1
    cols = read_rounds(path)
    assert cols["round"].tolist() == [0, 1, 2, 3]
    assert np.isnan(cols["asr"][[0, 2, 3]]).all() and cols["asr"][1] == 0.5
    assert cols["count"].tolist() == [-1, 7, -1, -1]
    assert cols["flag"].tolist() == [False, True, False, False]
    assert cols["vec"].shape == (4, K) and np.isnan(cols["vec"][0]).all() and (cols["vec"][1] == 1).all()
    assert np.isnan(cols["A"][2]) and cols["A"][3] == 3.0


def test_int_column_widens_to_float_and_bad_rows_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        run.append_round({"round": 0, "loss": 1})
        run.append_round({"round": 1, "loss": 0.5})
        with pytest.raises(ValueError, match="shape"):
            run.append_round({"round": 2, "loss": np.ones(3)})
        with pytest.raises(ValueError, match="must be a number"):
            run.append_round({"round": 2, "name": "x"})
        assert run.rounds_done() == 2
    cols = read_rounds(path)
    assert cols["loss"].dtype == np.float64 and cols["loss"].tolist() == [1.0, 0.5]


def test_truncate_then_append_has_no_duplicate_round(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        for t in range(5):
            run.append_round(row(t, old=float(t)))
            run.save_global_weights(t, np.full(12, t, np.float32))
        run.truncate_rounds(3)  # checkpoint of round 2: rows 3 and 4 go
        assert run.rounds_done() == 3
        for t in range(3, 6):
            run.append_round(row(t, A=100.0 + t))
            run.save_global_weights(t, np.full(12, 10 + t, np.float32))
    with h5py.File(path, "r") as f:
        assert f["rounds/round"][()].tolist() == [0, 1, 2, 3, 4, 5]
        assert f["rounds/A"][()].tolist() == [50.0, 51.0, 52.0, 103.0, 104.0, 105.0]
        # a column not in the new rows is NaN there, not the value of the cut rows
        assert f["rounds/old"][:3].tolist() == [0.0, 1.0, 2.0] and np.isnan(f["rounds/old"][3:]).all()
        assert f["global/round"][()].tolist() == [0, 1, 2, 3, 4, 5]
        assert f["global/weights"].dtype == np.float32 and f["global/weights"][4, 0] == 14.0


def test_truncate_after_round(tmp_path: Path) -> None:
    with make_run(tmp_path / "run.h5") as run:
        for t in range(1, 6):
            run.append_round(row(t))
        run.truncate_after(3)
        assert run.rounds_done() == 3 and run.last_round() == 3


def test_reopen_with_other_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    make_run(path).close()
    with pytest.raises(UserError, match=rf"run.h5 in {tmp_path} belongs to another config \(hash {HASH}\)"):
        RunFile.open(path, "ffffff")
    with RunFile.open(path, HASH) as run:  # the file is still fine and usable
        run.append_round(row(0))


def test_unreadable_run_files_are_user_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(UserError, match="unreadable or corrupt"):
        RunFile.open(garbage)
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        run.append_round(row(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="unreadable or corrupt"):
        RunFile.open(path, HASH)
    with pytest.raises(UserError, match="unreadable or corrupt"):
        read_summary(path)
    with pytest.raises(UserError, match="no run file"):
        RunFile.open(tmp_path / "missing.h5")


def test_create_refuses_existing_file_and_leaves_nothing_on_failure(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "run.h5"
    make_run(path).close()
    with pytest.raises(UserError, match="already exists"):
        make_run(path)

    def half_write(tmp: Path, attrs: dict, clients: dict) -> None:
        tmp.write_bytes(b"\x89HDF partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_write_new", half_write)
    fresh = tmp_path / "other" / "run.h5"
    with pytest.raises(UserError, match="could not create .*No space left on device"):
        make_run(fresh)
    assert list(fresh.parent.iterdir()) == []


def test_partial_round_is_cut_on_open(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        for t in range(3):
            run.append_round(row(t))
    with h5py.File(path, "r+") as f:  # as if killed between two columns of round 3
        f["rounds/A"].resize(4, axis=0)
    with pytest.warns(RuntimeWarning, match="partly written"), RunFile.open(path, HASH) as run:
        assert run.rounds_done() == 3
    with h5py.File(path, "r") as f:
        assert {ds.shape[0] for ds in f["rounds"].values()} == {3}


def test_status_attrs_and_summary(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with make_run(path) as run:
        for t in range(8):
            run.append_round(row(t, tpr=1.0 if t % 2 else 0.5))
        run.set_attr("final_sha256", "ab" * 32)
        run.set_status("complete")
        with pytest.raises(ValueError):
            run.set_status("done")
    s = read_summary(path)
    assert s["status"] == "complete" and s["rounds_done"] == 8 and s["last_round"] == 7
    assert s["config"].startswith("rounds: 5") and s["num_clients"] == K and s["num_malicious"] == 2
    assert s["final_A"] == pytest.approx(np.mean([53, 54, 55, 56, 57]))
    assert s["final_R"] == pytest.approx(np.mean([7, 6, 5, 4, 3]))
    assert s["final_V"] == pytest.approx(np.mean([46, 48, 50, 52, 54]))
    assert s["tpr_mean"] == pytest.approx(0.75) and s["fpr_mean"] == 0.0
    assert s["final_sha256"] == "ab" * 32
    text = format_summary(s)
    assert "complete" in text and "A 55" in text and "TPR 0.75" in text and "ab" * 32 in text
    assert s["final_R_paper"] is None and "R_paper n/a" in text  # no asr_incl_target column


def test_summary_shows_the_papers_r_stored_or_derived(tmp_path: Path) -> None:
    """R_paper and V_paper in inspect: the stored columns, or 100 - asr_incl_target in older files."""
    stored, derived = tmp_path / "stored.h5", tmp_path / "derived.h5"
    with make_run(stored) as run:
        for t in range(6):
            run.append_round(row(t, R_paper=1.0 * t, V_paper=2.0 * t))
    with make_run(derived) as run:
        for t in range(6):
            run.append_round(row(t, asr_incl_target=90.0 - t))
    s = read_summary(stored)
    assert s["final_R_paper"] == pytest.approx(3.0) and s["final_V_paper"] == pytest.approx(6.0)
    s = read_summary(derived)
    assert s["final_R_paper"] == pytest.approx(np.mean([11, 12, 13, 14, 15]))
    assert s["final_V_paper"] == pytest.approx(np.mean([(50 + t + 10 + t) / 2 for t in range(1, 6)]))
    text = format_summary(s)
    assert "R_paper 13" in text and "every triggered image" in text and "other classes" in text


def test_summary_of_a_run_without_rounds(tmp_path: Path) -> None:
    make_run(tmp_path / "run.h5").close()
    s = read_summary(tmp_path / "run.h5")
    assert s["rounds_done"] == 0 and s["final_A"] is None and s["tpr_mean"] is None
    assert "n/a" in format_summary(s)


# ----------------------------------------------------------------------------- checkpoints


def state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(1000).astype(np.float32)
    w[:3] = [np.nan, -0.0, np.inf]
    return dict(
        weights=w,
        rng_state={"torch_cpu": rng.integers(0, 256, 5056).astype(np.uint8),
                   "numpy/pcg64": np.array([2**64 - 1, 7], dtype=np.uint64), "counter": np.array(3)},
        defense_state={"history": rng.standard_normal((K, 10)), "flags": np.array([True, False]),
                       "empty": np.zeros((0, 3), np.float32)},
        extra={"seconds": np.array([1.5])},
    )


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def save(run_dir: Path, t: int, config_hash: str = HASH, keep: int = 3) -> Path:
    return write_checkpoint(run_dir, round=t, config_hash=config_hash, keep=keep, **state(t))


def test_checkpoint_round_trip_is_bitwise(tmp_path: Path) -> None:
    path = save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "round_0007.h5"
    ck = load_latest_checkpoint(tmp_path, HASH)
    want = state(7)
    assert ck is not None and ck.round == 7 and ck.path == path
    assert same_bits(ck.weights, want["weights"])
    for group in ("rng_state", "defense_state", "extra"):
        assert ck.__dict__[group].keys() == want[group].keys()
        for name, value in want[group].items():
            assert same_bits(ck.__dict__[group][name], np.asarray(value)), (group, name)


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path, HASH) is None
    assert load_latest_checkpoint(tmp_path / "missing", HASH) is None


def test_keeps_the_newest_n(tmp_path: Path) -> None:
    for t in range(6):
        save(tmp_path, t, keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 4, 5]
    save(tmp_path, 4, keep=3)  # rewound to round 4: round 5 belongs to an abandoned future
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_leftover_temp_file_is_ignored_and_cleaned(tmp_path: Path) -> None:
    save(tmp_path, 1)
    stale = tmp_path / "checkpoints" / ".round_0002.x1y2z3.h5.tmp"
    stale.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # a writer killed mid-write
    ck = load_latest_checkpoint(tmp_path, HASH)
    assert ck is not None and ck.round == 1
    save(tmp_path, 2)
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_0001.h5", "round_0002.h5"]


def test_truncated_newest_checkpoint_falls_back_with_warning(tmp_path: Path) -> None:
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointWarning, match="round_0002.h5"):
        ck = load_latest_checkpoint(tmp_path, HASH)
    assert ck is not None and ck.round == 1 and same_bits(ck.weights, state(1)["weights"])


def test_bit_flipped_checkpoint_falls_back_with_warning(tmp_path: Path) -> None:
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    with h5py.File(newest, "r") as f:
        offset = f["defense/history"].id.get_offset()
    assert offset is not None
    data = bytearray(newest.read_bytes())
    data[offset + 17] ^= 0x04
    newest.write_bytes(bytes(data))
    with h5py.File(newest, "r") as f:  # HDF5 itself sees nothing wrong
        assert f["defense/history"].shape == (K, 10)
    with pytest.warns(CheckpointWarning, match="round_0002.h5.*checksum"):
        ck = load_latest_checkpoint(tmp_path, HASH)
    assert ck is not None and ck.round == 1


def test_all_checkpoints_corrupt_is_a_user_error(tmp_path: Path) -> None:
    for t in (1, 2):
        save(tmp_path, t).write_bytes(b"junk")
    with pytest.warns(CheckpointWarning), pytest.raises(UserError, match="all 2 checkpoints"):
        load_latest_checkpoint(tmp_path, HASH)


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2, config_hash="other")
    with pytest.raises(UserError, match="round_0002.h5 belongs to another config \\(hash other\\)"):
        load_latest_checkpoint(tmp_path, HASH)


def test_unwritable_checkpoint_dir_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a directory")
    with pytest.raises(UserError, match="could not write checkpoint"):
        save(blocker / "run", 1)


def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save(tmp_path, 1)

    def no_space(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod.os, "replace", no_space)
    with pytest.raises(UserError, match=r"could not write checkpoint .*round_0002.h5: No space left on device"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_0001.h5"]
    ck = load_latest_checkpoint(tmp_path, HASH)
    assert ck is not None and ck.round == 1 and same_bits(ck.weights, state(1)["weights"])


# ----------------------------------------------------------------------------- lock

HOLD = """
    import sys, time
    from fdcr_mpi.store import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
"""
TRY = """
    import sys
    from fdcr_mpi.store import RunLock
    from fdcr_mpi.errors import UserError
    try:
        RunLock(sys.argv[1]).acquire()
    except UserError as exc:
        print(exc)
        sys.exit(2)
"""


def test_lock_refuses_second_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = run_py(HOLD, str(tmp_path), background=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        expected = f"{tmp_path} is in use by a live run (pid {holder.pid} on {socket.gethostname()})"
        other = run_py(TRY, str(tmp_path))
        assert other.returncode == 2 and other.stdout.strip() == expected
        with pytest.raises(UserError, match="in use by a live run"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    assert str(holder.pid) in (tmp_path / ".lock").read_text()  # stale file left by SIGKILL
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        assert run_py(TRY, str(tmp_path)).returncode == 2
    assert run_py(TRY, str(tmp_path)).returncode == 0  # released on exit
