"""Run files and checkpoints under attack (issue 19): byte flips, a full disk, deleted checkpoints, modes.

Every command ends in a normal exit or one sentence (never a traceback or a segfault), a
read-only command never changes a file, and no round that was written is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from fdcr_mpi.store import RunFile, list_checkpoints, read_rounds, read_summary
from tests.adversarial_tools import TINY, env, fdcr, run_worker, small_disk, tally, verdict

__all__ = ["tally"]  # the session fixture, imported for pytest

ROUNDS = 3
SHA = re.compile(r"final model sha256: ([0-9a-f]{64})")


def final_sha(stdout: str) -> str | None:
    found = SHA.findall(stdout)
    return found[-1] if found else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A complete tiny run (3 rounds, a checkpoint per round) and its final sha256."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = fdcr("run", *TINY, f"rounds={ROUNDS}", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr
    sha = final_sha(done.stdout)
    assert sha is not None
    return out, sha


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    for leftover in dest.glob(".lock"):
        leftover.unlink()
    return dest


def preempted_copy(source: Path, dest: Path) -> Path:
    """The reference as if stopped after round 2 of 3: its last checkpoint gone, status preempted
    (resuming it recomputes round 3, so resume writes into the file)."""
    copy_run(source, dest)
    (dest / "checkpoints" / f"round_{ROUNDS - 1:04d}.h5").unlink()
    with h5py.File(dest / "run.h5", "r+") as f:
        f.attrs["status"] = "preempted"
    return dest


def columns(path: Path) -> dict[str, np.ndarray]:
    """The run file's metric columns (not the timings, which differ between runs)."""
    return {k: v for k, v in read_rounds(path).items() if not k.startswith("seconds_")}


def same_rows(a: Path, b: Path) -> bool:
    ca, cb = columns(a), columns(b)
    return ca.keys() == cb.keys() and all(np.array_equal(ca[k], cb[k], equal_nan=True) for k in ca)


# ----------------------------------------------------------------------------- file modes


def test_run_files_and_checkpoints_are_created_with_the_umask(tmp_path: Path) -> None:
    """mkstemp's 0600 made run files unreadable for a group project directory."""
    code = textwrap.dedent("""
        import os, sys
        os.umask(0o002)
        from fdcr_mpi.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", code, "run", *TINY, "rounds=1", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env())
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((out / "run.h5").stat().st_mode) == 0o664
    (_, checkpoint), = list_checkpoints(out)
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o664
    os.chmod(out / "run.h5", 0o640)  # a mode chosen by hand survives opening to continue (a rewrite)
    RunFile.open(out / "run.h5").close()
    assert stat.S_IMODE((out / "run.h5").stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- a full disk


FILL_RUN_FILE = """
import sys
import numpy as np
from fdcr_mpi.store import writer as store
from fdcr_mpi.errors import UserError
from fdcr_mpi.store import RunFile

path, race, weights = sys.argv[1], sys.argv[2] == "race", sys.argv[3] == "weights"
K = 100
run = RunFile.create(path, config_yaml="rounds: 100000\\n", config_hash="h", version="0", num_clients=K,
                     sizes=np.ones(K), malicious=np.zeros(K, bool),
                     partition=[np.arange(i, i + 1) for i in range(K)], num_params=1)
if race:  # as if another process took the space between the check and HDF5's write
    store.ensure_space = lambda folder, nbytes: None
t = 0
try:
    while True:
        rng = np.random.default_rng(t)
        run.append_round({"round": t, "A": float(t), **{f"v{j}": rng.random(K) for j in range(10)}})
        if weights:
            run.save_global_weights(t, np.full(20000, t, np.float32))
        run.set_last("A", t + 0.5)
        t += 1
except UserError as exc:
    print(f"{t}|{exc}")
try:
    run.set_status("failed")
except UserError:
    pass
run.close()
"""


@pytest.mark.parametrize("race", ["checked", "race"])
@pytest.mark.parametrize("weights", ["rows", "weights"])
def test_a_full_disk_keeps_every_round_written_and_ends_cleanly(tmp_path: Path, race: str, weights: str,
                                                                tally) -> None:
    """HDF5 on a full disk raised RuntimeError, segfaulted at exit and left "addr overflow".

    "checked": the space check refuses the write before HDF5 starts it; "race": the check is
    disabled, so HDF5 itself meets the full disk: the write fails, the process still ends
    cleanly and the file keeps every earlier round.
    """
    with small_disk(tmp_path / "disk", "1200k") as disk:
        path = disk / "run.h5"
        done = subprocess.run([sys.executable, "-c", FILL_RUN_FILE, str(path), race, weights],
                              capture_output=True, text=True, timeout=300, env=env(), cwd=Path(__file__).parents[1])
        kept = tmp_path / "kept.h5"
        shutil.copy(path, kept)  # continuing needs room to rewrite the file: on another disk
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    written, message = done.stdout.strip().split("|", 1)
    assert "No space left on device" in message
    written = int(written)
    assert written > 0
    if race == "checked":  # the failing write was refused before it began: no partial row, and the
        with h5py.File(kept, "r") as f:  # run could still say that it failed
            assert len({ds.shape[0] for ds in f["rounds"].values()}) == 1
            assert len({ds.shape[0] for ds in f.get("global", {}).values()}) <= 1
            assert f.attrs["status"] == "failed"
    with RunFile.open(kept, "h") as run:  # resuming works; a half-written last round is cut
        n = run.rounds_done()
        assert n in (written, written + 1)
        cols = read_rounds(kept)
        assert cols["round"].tolist() == list(range(n))
        assert cols["A"][:written].tolist() == [t + 0.5 for t in range(written)]
        if weights == "weights":
            glob = run.file["global"]
            assert glob["round"][()].tolist() == list(range(glob["round"].shape[0]))
            assert all((glob["weights"][t] == t).all() for t in range(glob["round"].shape[0]))
    tally.record("full disk (run file)", f"{race}/{weights}", verdict(1, f"fdcr-mpi: error: {message}"),
                 lost=n < written)


def test_a_run_that_fills_the_disk_with_its_run_file_resumes_to_the_same_model(tmp_path: Path, reference,
                                                                               tally) -> None:
    """save_weights_every=1 makes run.h5 grow by a model per round; checkpoints only at the end."""
    args = [*TINY, "rounds=6", "runtime.save_weights_every=1", "runtime.checkpoint_every=100", "--quiet"]
    full_ref = fdcr("run", *args, "--out", str(tmp_path / "reference"))
    assert full_ref.returncode == 0, full_ref.stderr
    with small_disk(tmp_path / "disk", "1500k") as disk:
        out = disk / "run"
        full = fdcr("run", *args, "--out", str(out))
        assert verdict(full.returncode, full.stderr) == "clean error", full.stderr
        assert full.returncode == 2 and "No space left on device" in full.stderr
        shown = fdcr("inspect", str(out))  # the file on the full disk is readable as it is
        assert shown.returncode == 0 and "rounds done" in shown.stdout, shown.stderr
        written = read_summary(out / "run.h5")["rounds_done"]
        moved = copy_run(out, tmp_path / "moved")  # the user frees space (here: moves the run)
    assert 0 < written < 6
    resumed = fdcr("resume", str(moved), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert final_sha(resumed.stdout) == final_sha(full_ref.stdout)
    assert same_rows(moved / "run.h5", tmp_path / "reference" / "run.h5")
    tally.record("full disk (CLI)", "run.h5 grows past a 1.5 MB tmpfs", verdict(full.returncode, full.stderr))


# ----------------------------------------------------------------------------- complete runs


@pytest.mark.parametrize("how", ["deleted", "a file", "all corrupt"])
def test_resuming_a_complete_run_without_its_checkpoints_keeps_every_row(tmp_path: Path, reference, how: str,
                                                                         tally) -> None:
    """It cut every row and started over; killed part-way, the file said complete with fewer rounds."""
    out = copy_run(reference[0], tmp_path / "run")
    folder = out / "checkpoints"
    if how == "deleted":
        shutil.rmtree(folder)
    elif how == "a file":
        shutil.rmtree(folder)
        folder.write_text("not a folder")
    else:
        for _, path in list_checkpoints(out):
            path.write_bytes(b"junk")
    for command in (["resume", str(out)], ["run", *TINY, f"rounds={ROUNDS}", "--out", str(out)]):
        done = fdcr(*command)
        assert verdict(done.returncode, done.stderr) == "clean error", done.stderr
        tally.record("complete run, checkpoints " + how, command[0], verdict(done.returncode, done.stderr))
    summary = read_summary(out / "run.h5")
    assert summary["status"] == "complete" and summary["rounds_done"] == ROUNDS
    assert same_rows(out / "run.h5", reference[0] / "run.h5")


def test_a_run_that_says_complete_with_rounds_missing_counts_as_unfinished_and_resumes(tmp_path: Path, reference,
                                                                                       tally) -> None:
    """What the old resume left when killed part-way: status complete, fewer rounds than planned."""
    out = preempted_copy(reference[0], tmp_path / "sweep" / "seed0")
    with h5py.File(out / "run.h5", "r+") as f:
        f.attrs["status"] = "complete"
        for ds in f["rounds"].values():
            ds.resize(ROUNDS - 1, axis=0)
    sweep = tmp_path / "s.yaml"
    overrides = dict(item.split("=", 1) for item in TINY)
    sweep.write_text(yaml.safe_dump({"name": "s", "out": str(tmp_path / "sweep"), "axes": {"seed": [0]},
                                     "overrides": {**overrides, "rounds": ROUNDS}}))
    plan = fdcr("sweep", "plan", str(sweep))
    assert plan.returncode == 0 and re.search(r"0\s+running\s+seed0", plan.stdout), plan.stdout + plan.stderr
    report = fdcr("report", str(tmp_path / "sweep"), "--out", str(tmp_path / "report"))
    assert report.returncode == 2 and "none of the 1 runs found is complete" in report.stderr
    resumed = fdcr("resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert final_sha(resumed.stdout) == reference[1]
    assert same_rows(out / "run.h5", reference[0] / "run.h5")
    assert read_summary(out / "run.h5")["status"] == "complete"
    tally.record("complete with rounds missing", "plan, report, resume", "ok")


# ----------------------------------------------------------------------------- byte flips


def structure_offsets(path: Path) -> dict[str, list[int]]:
    """Where a flipped byte hurts: superblock, object headers, heaps and B-tree nodes, the config text."""
    data = path.read_bytes()
    with h5py.File(path, "r") as f:
        headers = [h5py.h5o.get_info(h5py.h5o.open(f.id, b"/")).addr]
        f.visititems(lambda name, obj: headers.append(h5py.h5o.get_info(obj.id).addr))
    nodes = [m.start() for m in re.finditer(rb"HEAP|GCOL|TREE|SNOD", data)]
    config = data.find(b"seed:")
    return {"superblock": list(range(0, 96)),
            "object header": [a + k for a in headers for k in range(0, 96)],
            "heap or node": [a + k for a in nodes for k in range(0, 64)],
            "config text": list(range(max(0, config - 64), config + 256))}


def flipped_copies(source: Path, dest: Path, per_region: int, seed: int) -> list[tuple[str, Path]]:
    """Copies of the run directory ``source``, each with one byte of run.h5 flipped."""
    rng = np.random.default_rng(seed)
    data = (source / "run.h5").read_bytes()
    copies = []
    for region, offsets in structure_offsets(source / "run.h5").items():
        for i in range(per_region):
            offset = int(rng.choice(offsets))
            flipped = bytearray(data)
            flipped[offset] ^= int(rng.integers(1, 256))
            run = copy_run(source, dest / f"{region.replace(' ', '-')}-{i}")
            (run / "run.h5").write_bytes(bytes(flipped))
            copies.append((f"{region} byte {offset}", run))
    return copies


def check_case(result: dict, reference_sha: str, run: Path | None) -> tuple[str, bool]:
    """(verdict, data lost) of one worker result; a resume that ends normally must finish the run."""
    outcome = verdict(result["code"], result["stderr"], None if result["escaped"] is None else result["escaped"])
    if result["escaped"] == "crash":
        outcome = "crash"
    lost = bool(result["changed"])
    if run is not None and outcome == "ok":
        lost = lost or final_sha(result["stdout"]) != reference_sha or read_rounds(run / "run.h5")["round"].tolist() \
            != list(range(ROUNDS))
    return outcome, lost


def test_byte_flipped_run_files_end_in_one_sentence_or_a_good_run(tmp_path: Path, reference, tally) -> None:
    """Damaged run.h5 gave RuntimeError, OSError, KeyError, yaml.ReaderError or a segfault in
    mark_failed, and one bad run stopped the whole report."""
    source, sha = reference
    complete = flipped_copies(source, tmp_path / "complete", per_region=6, seed=19)
    preempted = flipped_copies(preempted_copy(source, tmp_path / "preempted-source"), tmp_path / "preempted",
                               per_region=6, seed=20)
    cases, resumed = [], {}
    for label, run in complete + preempted:
        watch = [str(run / "run.h5")]
        cases += [{"id": f"{run}|inspect|{label}", "argv": ["inspect", str(run)], "unchanged": watch},
                  {"id": f"{run}|report|{label}", "argv": ["report", str(run), "--out", str(tmp_path / "report")],
                   "unchanged": watch},
                  {"id": f"{run}|resume|{label}", "argv": ["resume", str(run), "--quiet"]}]
        resumed[f"{run}|resume|{label}"] = run
    failures = []
    for result in run_worker(cases):
        outcome, lost = check_case(result, sha, resumed.get(result["id"]))
        tally.record("byte-flipped run.h5", result["id"].split("|")[1], outcome, lost)
        if outcome not in ("ok", "clean error") or lost:
            failures.append((result["id"], outcome, lost, result["escaped"], result["stderr"][-600:]))
    assert not failures, json.dumps(failures, indent=1)
    assert len(cases) == 3 * 4 * 6 * 2


def test_byte_flipped_checkpoints_fall_back_or_end_in_one_sentence(tmp_path: Path, reference, tally) -> None:
    source, sha = reference
    base = preempted_copy(source, tmp_path / "base")
    newest = base / "checkpoints" / f"round_{ROUNDS - 2:04d}.h5"
    data = newest.read_bytes()
    rng = np.random.default_rng(7)
    cases, runs = [], {}
    for i, offset in enumerate(sorted(rng.choice(len(data), size=24, replace=False))):
        run = copy_run(base, tmp_path / f"flip{i}")
        flipped = bytearray(data)
        flipped[int(offset)] ^= 0xFF
        (run / "checkpoints" / newest.name).write_bytes(bytes(flipped))
        cases.append({"id": f"{run}|resume|byte {offset}", "argv": ["resume", str(run), "--quiet"]})
        runs[cases[-1]["id"]] = run
    failures = []
    for result in run_worker(cases):
        outcome, lost = check_case(result, sha, runs[result["id"]])
        tally.record("byte-flipped checkpoint", "resume", outcome, lost)
        if outcome not in ("ok", "clean error") or lost:
            failures.append((result["id"], outcome, lost, result["escaped"], result["stderr"][-600:]))
        # a skipped checkpoint is one warning line, without the Python source line warnings add
        assert all(line.startswith("fdcr-mpi: ") for line in result["stderr"].splitlines() if line.strip())
    assert not failures, json.dumps(failures, indent=1)


def test_one_damaged_run_does_not_stop_report_plot_or_plan(tmp_path: Path, reference, tally) -> None:
    root = tmp_path / "sweep"
    good = copy_run(reference[0], root / "seed0")
    bad = copy_run(reference[0], root / "seed1")
    data = bytearray((bad / "run.h5").read_bytes())
    offset = data.find(b"seed:")
    data[offset : offset + 5] = b"\xff\xfe\x00\x01\x02"  # the stored config text: not UTF-8, not YAML
    (bad / "run.h5").write_bytes(bytes(data))
    sweep = tmp_path / "s.yaml"
    overrides = dict(item.split("=", 1) for item in TINY)
    sweep.write_text(yaml.safe_dump({"name": "s", "out": str(root), "axes": {"seed": [0, 1]},
                                     "overrides": {**overrides, "rounds": ROUNDS}}))
    for command, check in ((["report", str(root), "--out", str(tmp_path / "report")],
                            lambda: (tmp_path / "report" / "table4.md").is_file()),
                           (["plot", str(root), "--out", str(tmp_path / "figures")],
                            lambda: list((tmp_path / "figures").glob("fig3_*.png"))),
                           (["sweep", "plan", str(sweep)], lambda: True)):
        done = fdcr(*command)
        assert done.returncode == 0 and verdict(done.returncode, done.stderr) == "ok", done.stderr
        warned = [line for line in done.stderr.splitlines() if str(bad / "run.h5") in line]
        assert len(warned) == 1 and warned[0].startswith("fdcr-mpi: warning: "), done.stderr
        assert check()
        tally.record("one damaged run among good ones", command[0], "ok")
    assert re.search(r"1\s+unreadable\s+seed1", done.stdout) and re.search(r"0\s+complete\s+seed0", done.stdout)
    assert same_rows(good / "run.h5", reference[0] / "run.h5")
