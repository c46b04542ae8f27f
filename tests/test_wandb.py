"""Weights & Biases in offline mode (``runtime.wandb``, the ``wandb`` extra): every round of run.h5
in the offline run files, one W&B run id for every attempt of a run directory, one sentence
without the package (issue 17)."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.test_mpi import FDCR, env, final_sha, launch

TINY = ["data.dataset=digits", "train.local_epochs=1", "fisher.max_samples=32"]
BLOCK, HEADER = 32768, 7  # W&B's offline log: LevelDB's log layout after a 7-byte ':W&B' file header


def records(path: Path) -> Iterator[bytes]:
    """The records of an offline ``.wandb`` file (LevelDB log: 32 KiB blocks of chunks with a
    7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or kind == 0:
            pos += left
            continue
        parts += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            yield parts
            parts = b""


@pytest.fixture
def wandb_pb():
    """W&B's record protobufs (a skip without the wandb extra, which CI installs: a failure there)."""
    return pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="the wandb extra is not installed")


def history(wandb_pb, run_dir: Path) -> tuple[dict[int, dict[str, str]], list[str], dict[str, str]]:
    """Every offline run of ``run_dir``: the logged rows by step, the run ids, the config."""
    rows: dict[int, dict[str, str]] = {}
    ids, config = [], {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for raw in records(path):
            record = wandb_pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                config.update({item.key: item.value_json for item in record.run.config.update})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                rows[int(items["_step"])] = items
    return rows, ids, config


def test_every_round_of_the_run_file_is_in_the_offline_run(tmp_path: Path, wandb_pb) -> None:
    run = tmp_path / "run"
    final_sha(launch(["run", *TINY, "rounds=2", "runtime.wandb=true", "--quiet", "--out", str(run)], None))
    extended = final_sha(launch(["resume", str(run), "--rounds", "3", "--quiet"], None))  # a second attempt
    plain = final_sha(launch(["run", *TINY, "rounds=3", "--quiet", "--out", str(tmp_path / "plain")], None))
    assert extended == plain  # logging changes no result
    rows, ids, config = history(wandb_pb, run)
    assert len(ids) == 2 and len(set(ids)) == 1  # two attempts, one W&B run
    assert json.loads(config["rounds"]) == 3 and json.loads(config["seed"]) == 0  # the later attempt: extended
    with h5py.File(run / "run.h5") as f:
        a, removed = f["rounds/A"][()], f["rounds/removed"][()]
        alpha_hat = f["rounds/alpha_hat"][()]
    assert sorted(rows) == [1, 2, 3]
    for t in range(3):
        row = rows[t + 1]
        assert float(row["metrics/A"]) == pytest.approx(a[t], rel=1e-12)
        assert float(row["detection/removed"]) == removed[t].sum()
        np.testing.assert_allclose([float(row[f"clients/alpha_hat/{k:03d}"]) for k in range(10)], alpha_hat[t])
        assert json.loads(row["clients/alpha_hat/_type"]) == "histogram"


def test_without_the_package_it_is_one_sentence_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('wandb hidden by the test')\n")
    environment = {**env(), "PYTHONPATH": str(blocker.parent)}
    result = subprocess.run([str(FDCR), "run", *TINY, "rounds=2", "runtime.wandb=true", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "fdcr_mpi[wandb]" in result.stderr and "runtime.wandb=false" in result.stderr
    assert not (tmp_path / "run" / "run.h5").exists()  # refused before the run file is made
