"""One run, SPMD: every rank calls ``execute``; rank 0 serves, the others host clients.

Setup (config, data, run directory, checkpoint) is checked collectively: if any rank hits a
user error, every rank stops with rank 0 printing that one sentence, before any round. After
setup, an unexpected error in any rank aborts the whole job (``fail_job``).
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fdcr_mpi import __version__, metrics
from fdcr_mpi.checkpoint import RunLock, load_latest_checkpoint, write_checkpoint
from fdcr_mpi.config import BaseConfig, aggregation_path, config_hash, parallel_eval, to_yaml
from fdcr_mpi.defenses import create
from fdcr_mpi.defenses.base import Defense
from fdcr_mpi.errors import Preempted, UserError
from fdcr_mpi.experiment import Experiment, build_experiment
from fdcr_mpi.runtime import sentinel
from fdcr_mpi.runtime.allocator import tune_malloc
from fdcr_mpi.runtime.devices import default_threads, select_device
from fdcr_mpi.runtime.server import Server, StopFlag, weights_sha256
from fdcr_mpi.runtime.transport import client_blocks, fail_job, make_transport
from fdcr_mpi.runtime.worker import ClientRunner, worker_loop
from fdcr_mpi.store import RunFile

RUN_FILE = "run.h5"


class Recorder:
    """Rank 0's side effects of a round: checkpoint, run-file row, console line."""

    def __init__(self, out: Path, config: BaseConfig, exp: Experiment, quiet: bool = False) -> None:
        self.out, self.config, self.exp, self.quiet = out, config, exp, quiet
        self.hash = config_hash(config)
        self.run_file: RunFile | None = None
        self.stop = None  # the server's StopFlag: a stop request forces a checkpoint
        self.started = time.perf_counter()
        self.rounds_timed = 0
        self.watch = sentinel.Watch()  # the watcher that names a dying rank (MPI runs)

    def open(self, restart: bool) -> tuple[int, torch.Tensor | None, dict | None]:
        """Create or reopen the run file; returns (start round, weights, defense state) to resume from."""
        path = self.out / RUN_FILE
        if restart:
            path.unlink(missing_ok=True)
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        if path.exists():
            self.run_file = RunFile.open(path, config_hash=self.hash)
            checkpoint = load_latest_checkpoint(self.out, self.hash)
            if checkpoint is None:
                self.run_file.truncate_rounds(0)
                return 0, None, None
            self.run_file.truncate_rounds(checkpoint.round + 1)
            return checkpoint.round + 1, torch.from_numpy(checkpoint.weights.copy()), checkpoint.defense_state
        self.run_file = RunFile.create(
            path, config_yaml=to_yaml(self.config), config_hash=self.hash, version=__version__,
            num_clients=self.exp.num_clients, sizes=self.exp.sizes, malicious=self.exp.malicious,
            partition=self.exp.partition, num_params=0)
        return 0, None, None

    def record_round(self, t: int, row: dict, weights: torch.Tensor, defense: Defense,
                     seconds: dict[str, float], round_start: float) -> None:
        """Append the round's row, then checkpoint w_{t+1}: a kill between the two leaves a row
        without a checkpoint, which resume cuts and recomputes (never a checkpoint without its row)."""
        rt = self.config.runtime
        write_start = time.perf_counter()
        flat = weights.numpy()
        row.update({f"seconds_{name}": value for name, value in seconds.items()})
        row["seconds_write"] = row["seconds_round"] = float("nan")
        self.run_file.append_round(row)
        if rt.save_weights_every and (t + 1) % rt.save_weights_every == 0:
            self.run_file.save_global_weights(t, flat)
        stopping = self.stop is not None and self.stop.signum is not None
        if (t + 1) % rt.checkpoint_every == 0 or t + 1 == self.config.rounds or stopping:
            write_checkpoint(self.out, round=t, config_hash=self.hash, weights=flat,
                             rng_state={}, defense_state=defense.state_dict(), keep=rt.keep_checkpoints)
        now = time.perf_counter()
        self.run_file.set_last("seconds_write", now - write_start)
        self.run_file.set_last("seconds_round", now - round_start)
        self.print_round(t, row, now - round_start)
        self.watch.recorded(t + 1)

    def print_round(self, t: int, row: dict, round_seconds: float) -> None:
        if self.quiet:
            return
        self.rounds_timed += 1
        left = self.config.rounds - t - 1
        eta = (time.perf_counter() - self.started) / self.rounds_timed * left
        removed = np.flatnonzero(row["removed"]).tolist()
        print(f"round {t + 1:>3}/{self.config.rounds}  A {row['A']:6.2f}  R {row['R']:6.2f}  "
              f"V {row['V']:6.2f}  removed {removed}  {round_seconds:6.1f} s  ETA {format_eta(eta)}",
              flush=True)

    def mark_failed(self) -> None:
        """Best effort: status 'failed' (the rows and checkpoints already written stay valid)."""
        try:
            if self.run_file is not None:
                self.run_file.set_status("failed")
                self.run_file.close()
        except (OSError, UserError, ValueError):
            pass

    def finish(self, weights: torch.Tensor, status: str) -> str:
        digest = weights_sha256(weights)
        if status == "complete":
            self.run_file.set_attr("final_sha256", digest)
        self.run_file.set_status(status)
        self.run_file.close()
        return digest


def participation(config: BaseConfig) -> str:
    """', 100 clients per round, reduce path' when either differs from the default."""
    part = f", {config.clients_per_round} clients per round" if config.clients_per_round else ""
    return part + (", reduce path" if aggregation_path(config) == "reduce" else "")


def placement(identities: list[str], num_clients: int, group: int = 1) -> str:
    """'1:[0-4] (host:pid) 2:[5-9] (host:pid)': the clients and process of each client rank.

    When a rank dies without a word (SIGKILL, OOM), mpiexec or srun reports its pid or rank;
    this line, printed at start, tells which clients it hosted.
    """
    parts = [f"0:server ({identities[0]})"]
    for rank, ids in enumerate(client_blocks(num_clients, len(identities), group)):
        if ids:
            span = f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else f"{ids[0]}"
            parts.append(f"{rank}:[{span}] ({identities[rank]})")
    return " ".join(parts)


def make_run_dir(out: Path) -> None:
    """Create the run directory, or one sentence saying why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the run directory {out}: {exc.strerror or exc}") from None


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def setup_process(config: BaseConfig, ranks_on_node: int) -> None:
    """This process's intra-op threads and, unless ``runtime.malloc`` is ``default``, the C
    allocator's thresholds (``allocator.tune_malloc``)."""
    torch.set_num_threads(config.runtime.threads or default_threads(ranks_on_node))
    if config.runtime.malloc == "tuned":
        tune_malloc()


def execute(config: BaseConfig, out: Path, *, restart: bool = False, transport_kind: str = "auto",
            quiet: bool = False) -> int:
    """Run (or resume) the experiment on every rank; returns the process exit code."""
    transport = make_transport(transport_kind)
    stop = StopFlag()
    if transport.is_server:
        stop.install()  # from the start: a SIGTERM/SIGUSR1 during setup stops before round 1
    else:
        ignore_stop_signals()  # the server decides when to stop and tells every rank
    setup_error: str | None = None
    lock = None
    try:
        local = transport.local_rank()
        setup_process(config, _ranks_on_node(transport))
        device = select_device(config.runtime.device, local)
        client_ids = transport.clients_of(transport.rank, config.data.num_clients, config.train.batch_clients)
        defense = create(config.defense.name, **getattr(config, config.defense.name).model_dump())
        exp = build_experiment(config, client_ids, server=transport.is_server, with_proxy=defense.needs_proxy,
                               evaluates=parallel_eval(config, transport.size))
        runner = ClientRunner(exp, client_ids, with_fisher=defense.needs_fisher, device=device,
                              pinned=device.type == "cuda", rank=transport.rank)
        if transport.is_server:
            make_run_dir(out)
            lock = RunLock(out).acquire()
            recorder = Recorder(out, config, exp, quiet=quiet)
            start, weights, state = recorder.open(restart)
    except UserError as exc:
        setup_error = str(exc)
    setup_error = transport.first_error(setup_error)
    identities = transport.identities()
    if setup_error is not None:
        if lock is not None:
            lock.release()
        raise UserError(setup_error)

    if not transport.is_server:
        try:
            worker_loop(transport, runner, defense)
        except BaseException as exc:  # noqa: BLE001 - any failure must end the whole job
            sentinel.note_failure(out, transport.rank, exc)
            fail_job(transport, exc)
        return 0

    try:
        recorder.watch = sentinel.begin_attempt(out, identities, client_blocks(
            config.data.num_clients, len(identities), config.train.batch_clients), start, config.rounds)
        server = Server(transport, exp, runner, defense, device, recorder)
        if state:
            defense.load_state_dict(state)
        if weights is None:
            weights = server.initial_weights()
        if start >= config.rounds:
            server.run(start, weights)  # tells the workers to stop
            digest = recorder.finish(weights, "complete")
            print(f"run in {out} is already complete ({config.rounds} rounds)\nfinal model sha256: {digest}")
            return 0
        if not quiet:
            print(f"fdcr-mpi {__version__}: {config.defense.name} on {config.data.dataset}, "
                  f"{config.data.num_clients} clients ({int(exp.malicious.sum())} attackers), "
                  f"{config.rounds} rounds{participation(config)}, {transport.describe()}, device {device}"
                  + (f", resuming at round {start + 1}" if start else ""), flush=True)
            if transport.size > 1:
                print("clients by rank: " + placement(identities, config.data.num_clients,
                                                         config.train.batch_clients), flush=True)
        server.stop = recorder.stop = stop
        weights = server.run(start, weights)
        rounds_done = recorder.run_file.rounds_done()
        done = rounds_done >= config.rounds
        digest = recorder.finish(weights, "complete" if done else "preempted")
        if not done:
            raise Preempted(f"stopped by signal {server.stop.signum} after round "
                            f"{rounds_done}; resume with: fdcr-mpi resume {out}")
        print_final(out / RUN_FILE, config, digest, quiet)
        return 0
    except Preempted:
        raise
    except UserError as exc:
        recorder.watch.done()  # an orderly end, even though it stops every rank
        recorder.mark_failed()
        if transport.size > 1:  # the client ranks wait for the next round: end them too
            sys.stderr.write(f"fdcr-mpi: error: {exc}\n")
            transport.abort(exc.exit_code)
        raise
    except BaseException as exc:  # noqa: BLE001
        recorder.watch.failed(exc)
        recorder.mark_failed()
        if transport.size > 1:
            fail_job(transport, exc)
        raise
    finally:
        recorder.watch.done()  # no-op after failed()
        if lock is not None:
            lock.release()


def ignore_stop_signals() -> None:
    """Client ranks let SIGTERM/SIGUSR1 pass: SLURM signals every task, the server coordinates the stop."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _ranks_on_node(transport) -> int:
    if transport.size == 1:
        return 1
    return transport.comm.Split_type(transport.MPI.COMM_TYPE_SHARED).Get_size()


def print_final(path: Path, config: BaseConfig, digest: str, quiet: bool) -> None:
    from fdcr_mpi.store import read_rounds

    rounds = read_rounds(path)
    last = config.eval.final_rounds
    figures = {name: metrics.final_figure(rounds[name], last) for name in ("A", "R", "V", "tpr", "fpr")}
    if not quiet:
        print(f"final (mean of last {last} rounds): A {figures['A']:.2f}  R {figures['R']:.2f}  "
              f"V {figures['V']:.2f}  detection TPR {figures['tpr']:.2f}  FPR {figures['fpr']:.2f}")
    print(f"final model sha256: {digest}", flush=True)
    sys.stdout.flush()
