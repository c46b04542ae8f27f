"""Rank 0's record of a run: the run file's rows, the checkpoints, the console line, the final sha.

Only rank 0 writes files. A round's row is appended before its checkpoint, so a kill between the
two leaves a row that resume cuts and recomputes, never a checkpoint without its row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fdcr_mpi import __version__
from fdcr_mpi.config import BaseConfig, config_differences, config_hash, from_yaml, to_yaml
from fdcr_mpi.data.experiment import Experiment
from fdcr_mpi.defenses.base import Defense
from fdcr_mpi.errors import UserError
from fdcr_mpi.program import resume_command
from fdcr_mpi.runtime import numerics, sentinel
from fdcr_mpi.runtime.extension import differs_only_in_rounds, extended_config
from fdcr_mpi.runtime.round import RoundRecord, round_row
from fdcr_mpi.store import (
    NUMERICS,
    NUMERICS_CHANGES,
    RUN_FILE,
    RunFile,
    load_latest_checkpoint,
    read_summary,
    write_checkpoint,
)
from fdcr_mpi.store.tensorboard import TensorBoardLog
from fdcr_mpi.store.wandb_log import WandbLog, import_wandb, run_id


def weights_sha256(weights: np.ndarray | torch.Tensor) -> str:
    """sha256 of the flat float32 weights as little-endian bytes (the run's fingerprint)."""
    array = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else weights
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM preemption or time limit): stop after the current round."""

    signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum


class Recorder:
    """Rank 0's side effects of a round: checkpoint, run-file row, console line."""

    def __init__(self, out: Path, config: BaseConfig, exp: Experiment, defense: Defense, quiet: bool = False,
                 fingerprint: dict[str, str] | None = None, allow_numerics_change: bool = False,
                 num_params: int = 0, extend: bool = False) -> None:
        self.out, self.config, self.exp, self.defense, self.quiet = out, config, exp, defense, quiet
        self.extend = extend  # resume --rounds: the run file may hold this config with fewer rounds
        self.num_params = num_params
        self.fingerprint = fingerprint or {}
        self.allow_numerics_change = allow_numerics_change
        self.hash = config_hash(config)
        self.run_file: RunFile | None = None
        self.stop = None  # the server's StopFlag: a stop request forces a checkpoint
        self.started = time.perf_counter()
        self.rounds_timed = 0
        self.watch = sentinel.Watch()  # the watcher that names a dying rank (MPI runs)
        self.views: list[TensorBoardLog | WandbLog] = []  # TensorBoard, W&B: views of the run file

    def open(self, restart: bool) -> tuple[int, torch.Tensor | None, dict | None]:
        """Create or reopen the run file (and the TensorBoard and W&B logs); returns (start round,
        weights, defense state) to resume from."""
        rt = self.config.runtime
        if rt.wandb:
            import_wandb()  # asked for without the package: one sentence before the run file is touched
        start, weights, state = self.open_run_file(restart)
        if rt.tensorboard:
            self.views.append(TensorBoardLog(self.out, first_step=start + 1))
        if rt.wandb:
            first_hash = (self.run_file.earlier_hashes() or [self.hash])[0]
            created = str(self.run_file.file.attrs.get("created", ""))
            self.views.append(WandbLog(self.out, self.config.model_dump(mode="json"),
                                       run_id(first_hash, created), rt.wandb_project))
        return start, weights, state

    def open_run_file(self, restart: bool) -> tuple[int, torch.Tensor | None, dict | None]:
        path = self.out / RUN_FILE
        if restart:
            path.unlink(missing_ok=True)
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        if path.exists():
            try:
                self.run_file = RunFile.open(path, config_hash=None if self.extend else self.hash)
            except UserError as exc:
                raise UserError(self.extension_hint(path) or self.difference_note(path, str(exc))) from None
            self.take_extension()
            self.check_numerics()
            checkpoint = load_latest_checkpoint(self.out, self.hash, earlier=self.run_file.earlier_hashes())
            if checkpoint is None:
                self.run_file.truncate_rounds(0)
                return 0, None, None
            self.run_file.truncate_rounds(checkpoint.round + 1)
            return checkpoint.round + 1, torch.from_numpy(checkpoint.weights.copy()), checkpoint.defense_state
        self.run_file = RunFile.create(
            path, config_yaml=to_yaml(self.config), config_hash=self.hash, version=__version__,
            num_clients=self.exp.num_clients, sizes=self.exp.sizes, malicious=self.exp.malicious,
            partition=self.exp.partition, num_params=self.num_params)
        self.run_file.set_attr(NUMERICS, json.dumps(self.fingerprint, sort_keys=True))
        return 0, None, None

    def difference_note(self, path: Path, message: str) -> str:
        """``message`` (the run file belongs to another config), with the keys in which the configs differ
        when the stored one can be read: what to set to continue that run instead."""
        with contextlib.suppress(UserError, KeyError):
            differences = config_differences(from_yaml(str(read_summary(path)["config"])), self.config)
            if differences:
                return f"{message}; it differs from this command in {differences}"
        return message

    def extension_hint(self, path: Path) -> str | None:
        """The run file holds this config with fewer rounds: the command that extends it."""
        with contextlib.suppress(UserError):
            stored = from_yaml(str(read_summary(path)["config"]))
            if stored.rounds < self.config.rounds and differs_only_in_rounds(stored, self.config):
                return (f"{self.out} holds this run with {stored.rounds} rounds; to extend it to {self.config.rounds}: "
                        f"{resume_command(self.out)} --rounds {self.config.rounds} (or use a new --out directory)")
        return None

    def take_extension(self) -> None:
        """``resume --rounds N``: a run file of the same config with fewer rounds takes this config
        (``runtime.extension``); any other config is refused, as for any resume."""
        if not self.extend or self.run_file.config_hash == self.hash:
            return
        where = str(self.out)
        stored = from_yaml(self.run_file.config_yaml())
        if not differs_only_in_rounds(stored, self.config):
            raise UserError(f"{RUN_FILE} in {where} belongs to another config (hash {self.run_file.config_hash}); "
                            "use a new --out directory or the same config")
        rounds_done = self.run_file.rounds_done()
        extended_config(stored, self.config.rounds, rounds_done, where)  # the same checks, now under the lock
        self.run_file.extend(to_yaml(self.config), self.hash, {
            "from_rounds": stored.rounds, "to_rounds": self.config.rounds, "rounds_done": rounds_done,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def check_numerics(self) -> None:
        """Resume only where the numbers come out the same: the run file's fingerprint against
        this launch's; a difference is a UserError unless allowed (then recorded in the file)."""
        stored = self.run_file.file.attrs.get(NUMERICS)
        recorded = json.loads(stored) if stored else {}
        diff = numerics.differences(recorded, self.fingerprint)
        if not diff or not recorded:
            return
        if not self.allow_numerics_change:
            raise UserError(f"this launch would compute the rest of {self.out} with other numerics than its "
                            f"first rounds ({'; '.join(diff)}); resume where it ran, or pass "
                            "--allow-numerics-change to continue anyway (the run file records it)")
        changes = json.loads(self.run_file.file.attrs.get(NUMERICS_CHANGES, "[]"))
        changes.append({"rounds_done": self.run_file.rounds_done(), "changed": diff, "fingerprint": self.fingerprint})
        self.run_file.set_attr(NUMERICS_CHANGES, json.dumps(changes, sort_keys=True))

    def record(self, outcome: RoundRecord) -> None:
        """Append the round's row, then checkpoint w_{t+1}: a kill between the two leaves a row
        without a checkpoint, which resume cuts and recomputes (never a checkpoint without its row)."""
        rt, t, seconds = self.config.runtime, outcome.round, outcome.seconds
        row = round_row(self.exp, outcome)
        write_start = time.perf_counter()
        flat = outcome.weights.numpy()
        row.update({f"seconds_{name}": value for name, value in seconds.items()})
        row["seconds_write"] = row["seconds_round"] = float("nan")
        self.run_file.append_round(row)
        if rt.save_weights_every and (t + 1) % rt.save_weights_every == 0:
            self.run_file.save_global_weights(t, flat)
        stopping = self.stop is not None and self.stop.signum is not None
        if (t + 1) % rt.checkpoint_every == 0 or t + 1 == self.config.rounds or stopping:
            write_checkpoint(self.out, round=t, config_hash=self.hash, weights=flat,
                             rng_state={}, defense_state=self.defense.state_dict(), keep=rt.keep_checkpoints)
        now = time.perf_counter()
        row["seconds_write"], row["seconds_round"] = now - write_start, now - outcome.started
        self.run_file.set_last("seconds_write", row["seconds_write"])
        self.run_file.set_last("seconds_round", row["seconds_round"])
        for view in self.views:
            view.write(row)
        self.print_round(t, row, now - outcome.started)
        self.watch.recorded(t + 1)

    def print_round(self, t: int, row: dict, round_seconds: float) -> None:
        if self.quiet:
            return
        self.rounds_timed += 1
        left = self.config.rounds - t - 1
        eta = (time.perf_counter() - self.started) / self.rounds_timed * left
        removed = np.flatnonzero(row["removed"]).tolist()
        print(f"round {t + 1:>3}/{self.config.rounds}  A {row['A']:6.2f}  R {row['R']:6.2f}  "
              f"R_paper {row['R_paper']:6.2f}  V {row['V']:6.2f}  removed {removed}  {round_seconds:6.1f} s  "
              f"ETA {format_eta(eta)}", flush=True)

    def close_views(self) -> None:
        for view in self.views:
            view.close()
        self.views = []

    def mark_failed(self) -> None:
        """Best effort: status 'failed' (the rows and checkpoints already written stay valid)."""
        self.close_views()
        try:
            if self.run_file is not None:
                self.run_file.set_status("failed")
                self.run_file.close()
        except (OSError, UserError, ValueError):
            pass

    def finish(self, weights: torch.Tensor, status: str) -> str:
        digest = weights_sha256(weights)
        self.close_views()
        if status == "complete":
            self.run_file.set_attr("final_sha256", digest)
        self.run_file.set_status(status)
        self.run_file.close()
        return digest


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
