"""One run, SPMD: every rank calls ``execute``; rank 0 serves, the others host clients.

Setup (config, placement, data, run directory, checkpoint) is checked collectively: if any rank
hits a user error, every rank stops with rank 0 printing that one sentence, before any round.
Then every rank builds its ``RunContext`` and runs the rounds (``runtime.round``); rank 0 records
them (``runtime.recorder``). After setup, an unexpected error in any rank aborts the whole job
(``fail_job``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fdcr_mpi import __version__, seeding
from fdcr_mpi.attacks.collusion import stage_needed
from fdcr_mpi.attacks.round_trigger import RoundTrigger
from fdcr_mpi.config import (
    BaseConfig,
    aggregation_path,
    from_yaml,
    parallel_eval,
    participants,
    to_yaml,
)
from fdcr_mpi.data.datasets import model_input
from fdcr_mpi.data.experiment import Experiment, build_experiment
from fdcr_mpi.defenses import create
from fdcr_mpi.defenses.base import Defense, ProxyData
from fdcr_mpi.errors import Preempted, UserError
from fdcr_mpi.models import build_model
from fdcr_mpi.program import resume_command
from fdcr_mpi.runtime import numerics, placement, preload, sentinel
from fdcr_mpi.runtime.allocator import tune_malloc
from fdcr_mpi.runtime.clients import ClientRunner
from fdcr_mpi.runtime.faults import InjectedFault
from fdcr_mpi.runtime.protocol import META, SendBlocks
from fdcr_mpi.runtime.recorder import RUN_FILE, Recorder, StopFlag
from fdcr_mpi.runtime.round import RunContext, run_rounds
from fdcr_mpi.runtime.staging import host_buffer
from fdcr_mpi.runtime.transport import client_blocks, fail_job, make_transport
from fdcr_mpi.store import RunLock


def participation(config: BaseConfig) -> str:
    """', 100 clients per round, reduce path' when either differs from the default."""
    part = f", {config.clients_per_round} clients per round" if config.clients_per_round else ""
    return part + (", reduce path" if aggregation_path(config) == "reduce" else "")


def placement_line(identities: list[str], num_clients: int, group: int = 1) -> str:
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


def idle_note(num_clients: int, group: int, ranks: int, workers: int) -> str | None:
    """A note when the batched groups (``train.batch_clients``) are fewer than the client ranks (under
    MPI) or the worker threads (one process): some of them then have nothing to train. None otherwise."""
    groups = -(-num_clients // group)
    units, what = (ranks - 1, "client ranks") if ranks > 1 else (workers, "worker threads")
    if group == 1 or groups >= units:
        return None
    return (f"note: the {num_clients} clients train in {groups} batched group{'s' * (groups > 1)} of up to {group} "
            f"(train.batch_clients={group}), so {units - groups} of the {units} {what} have no client; "
            "train.batch_clients=1 trains them one by one (another config: results differ by float rounding)")


def make_run_dir(out: Path) -> None:
    """Create the run directory, or one sentence saying why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the run directory {out}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Launch:
    """What this rank is in the job: its clients, device and workers, and the run's numerics."""

    client_ids: list[int]
    device: torch.device
    workers: int
    fingerprint: dict[str, str]
    identities: list[str]  # 'node:pid' of every rank
    nodes: list[str]  # every rank's node name

    def leader(self, rank: int) -> int:
        """The first rank of ``rank``'s node."""
        return placement.Node.of(rank, self.nodes).ranks[0]


def place(config: BaseConfig, transport) -> tuple[Launch | None, str | None]:
    """Collective: every rank's node, device, workers and numerics (a rank's error in the sentence)."""
    rt = config.runtime
    is_client_rank = transport.size == 1 or transport.rank != 0
    cores = placement.available_cores()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    seen = transport.allgather((placement.node_name(), f"{placement.node_name()}:{os.getpid()}", affinity))
    names = [name for name, _, _ in seen]
    node = placement.Node.of(transport.rank, names)
    sharing = sum(1 for r in node.client_ranks if set(seen[r][2]) & set(affinity)) or 1
    error, launch = None, None
    try:
        check_fault(config, transport.size)
        device = placement.select_device(rt.device, is_client_rank, node.client_index(transport.rank))
        threads = (rt.threads or placement.default_threads(cores, sharing)) if is_client_rank else 1
        numerics.configure(rt.client_threads, device, deterministic=rt.deterministic, tf32=rt.tf32)
        fingerprint = numerics.fingerprint(rt.client_threads, device, deterministic=rt.deterministic, tf32=rt.tf32)
        ids = transport.clients_of(transport.rank, config.data.num_clients, config.train.batch_clients)
        launch = Launch(ids, device, placement.workers(threads, rt.client_threads, device), fingerprint,
                        [identity for _, identity, _ in seen], names)
    except UserError as exc:
        error = str(exc)
    error = transport.first_error(error)
    if error is not None:
        return None, error
    prints = transport.allgather(launch.fingerprint)
    try:
        run_print = numerics.merge(prints, [transport.size == 1 or r != 0 for r in range(transport.size)])
    except ValueError as exc:
        return None, (f"the ranks of this job would compute with different numerics, so the results would depend "
                      f"on which rank hosts which client: {exc}; run on nodes of one kind")
    return Launch(launch.client_ids, launch.device, launch.workers, run_print, launch.identities, names), None


def fetch_data(config: BaseConfig, transport, launch: Launch) -> str | None:
    """Collective, with ``data.download``: rank 0 downloads first; then the first rank of every
    other node checks its own copy (a node-local root) and downloads what is missing; only then
    do the ranks read. One rank per file system writes, so no two downloads race in a folder."""
    if not config.data.download:
        return None
    from fdcr_mpi.data.datasets import fetch

    data = config.data
    error: str | None = None
    for turn in ("server", "nodes"):
        mine = transport.rank == 0 if turn == "server" else transport.rank == launch.leader(transport.rank) != 0
        if mine and error is None:
            try:
                fetch(data.dataset, data.root, data.mirror)
            except UserError as exc:
                error = str(exc)
        error = transport.first_error(error)
    return error


def check_fault(config: BaseConfig, ranks: int) -> None:
    """``runtime.fault`` must name a rank and client that exist in this launch (else it would do nothing)."""
    fault = config.runtime.fault
    if fault.kind == "none":
        return
    blocks = client_blocks(config.data.num_clients, ranks, config.train.batch_clients)
    valid = [0] if ranks == 1 else [r for r in range(1, ranks) if blocks[r]]
    if fault.rank not in valid:
        where = "0 in one process" if ranks == 1 else f"a client rank of this launch ({valid[0]}-{valid[-1]})"
        raise UserError(f"runtime.fault.rank is {fault.rank}, but the fault must be on {where}")
    if fault.client is not None and fault.client not in blocks[fault.rank]:
        raise UserError(f"runtime.fault.client {fault.client} is not hosted by rank {fault.rank} "
                        f"(its clients: {sentinel.clients_label(blocks[fault.rank])})")
    if fault.round >= config.rounds:
        raise UserError(f"runtime.fault.round is {fault.round}, but the run has rounds 0-{config.rounds - 1}")


def prepare_process(config: BaseConfig) -> None:
    """Before any work: a fixed cuBLAS workspace (numerics) and, unless ``runtime.malloc`` is
    ``default``, the C allocator's thresholds (``allocator.tune_malloc``)."""
    numerics.prepare_process()
    if config.runtime.malloc == "tuned":
        tune_malloc()


def execute(config: BaseConfig | Callable[[], BaseConfig], out: Path, *, restart: bool = False,
            transport_kind: str = "auto", quiet: bool = False, allow_numerics_change: bool = False,
            extend: bool = False) -> int:
    """Run (or resume) the experiment on every rank; returns the process exit code.

    ``config`` is the config, or a function that reads it, called on rank 0 only (the run file of
    a resumed run is opened by rank 0 alone) and shared with the other ranks. ``extend``: the run
    in ``out`` may hold this config with fewer rounds, and takes this one (``resume --rounds``,
    ``runtime.extension``).
    """
    transport = make_transport(transport_kind)
    stop = StopFlag()
    if transport.is_server:
        stop.install()  # from the start: a SIGTERM/SIGUSR1 during setup stops before round 1
    else:
        ignore_stop_signals()  # the server decides when to stop and tells every rank
    config, error = shared_config(config, transport)
    if error is not None:
        raise UserError(error)
    prepare_process(config)
    launch, error = place(config, transport)
    if error is None:
        error = fetch_data(config, transport, launch)
    if error is not None:
        raise UserError(error)
    setup_error: str | None = None
    lock = None
    try:
        defense = create(config.defense.name, **getattr(config, config.defense.name).model_dump())
        evaluates = parallel_eval(config, transport.size)
        share = ((transport.rank - 1, transport.size - 1) if transport.rank > 0 else None) if evaluates \
            else ((0, 1) if transport.is_server else None)
        exp = build_experiment(config, launch.client_ids, eval_share=share, server=transport.is_server,
                               with_proxy=defense.needs_proxy, device=launch.device)
        runner = ClientRunner(exp, launch.client_ids, with_fisher=defense.needs_fisher, device=launch.device,
                              workers=launch.workers, rank=transport.rank)
        if transport.is_server:
            make_run_dir(out)
            lock = RunLock(out).acquire()
            sentinel.clear_records(out)  # before any node's watcher starts (after this setup)
            recorder = Recorder(out, config, exp, defense, quiet=quiet, fingerprint=launch.fingerprint,
                                allow_numerics_change=allow_numerics_change, num_params=runner.model.num_params,
                                extend=extend)
            start, weights, state = recorder.open(restart)
    except UserError as exc:
        setup_error = str(exc)
    setup_error = transport.first_error(setup_error)
    identities = launch.identities
    if setup_error is not None:
        if lock is not None:
            lock.release()
        raise UserError(setup_error)
    if transport.is_server:
        preload.start(defense.server_imports())  # while the first round trains

    ctx = run_context(config, transport, exp, runner, defense)
    leader = launch.leader(transport.rank)
    node_watch, listener = sentinel.Watch(), None
    if transport.size > 1 and transport.rank == leader:  # the first rank of every node
        listener = sentinel.listen(identities, leader)  # before the collective its node's other ranks join after
        if leader != 0:
            node_watch = sentinel.watch_node(out, identities, ctx.blocks, leader, listener)
    watching = transport.allgather(node_watch.active)
    if transport.size > 1 and transport.rank != leader:
        node_watch = sentinel.join(identities, leader)
    if not transport.is_server:
        try:
            run_rounds(ctx, 0, torch.empty(0), stop, record=None)  # the server's header says which round
        except BaseException as exc:  # noqa: BLE001 - any failure must end the whole job
            sentinel.note_failure(out, transport.rank, exc)
            fail_job(transport, exc)
        finally:
            runner.close()
        node_watch.done()
        return 0

    try:
        remote = [r for r in range(transport.size) if launch.leader(r) != 0 and watching[launch.leader(r)]]
        recorder.watch = sentinel.begin_attempt(out, identities, ctx.blocks, start, config.rounds, remote,
                                                listener)
        if state:
            defense.load_state_dict(state)
        if weights is None:
            weights = initial_weights(config)
        if start >= config.rounds:
            run_rounds(ctx, start, weights, stop, recorder.record)  # tells the client ranks to stop
            digest = recorder.finish(weights, "complete")
            print(f"run in {out} is already complete ({config.rounds} rounds)\nfinal model sha256: {digest}")
            return 0
        if not quiet:
            print(f"fdcr-mpi {__version__}: {config.defense.name} on {config.data.dataset}, "
                  f"{config.data.num_clients} clients ({int(exp.malicious.sum())} attackers), "
                  f"{config.rounds} rounds{participation(config)}, {transport.describe()}, "
                  f"{describe_launch(launch, transport.size)}"
                  + (f", resuming at round {start + 1}" if start else ""), flush=True)
            if transport.size > 1:
                print("clients by rank: " + placement_line(identities, config.data.num_clients,
                                                             config.train.batch_clients), flush=True)
            note = idle_note(config.data.num_clients, config.train.batch_clients, transport.size, launch.workers)
            if note:
                print(note, flush=True)
        recorder.stop = stop
        weights = run_rounds(ctx, start, weights, stop, recorder.record)
        rounds_done = recorder.run_file.rounds_done()
        done = rounds_done >= config.rounds
        digest = recorder.finish(weights, "complete" if done else "preempted")
        if not done:
            raise Preempted(f"stopped by signal {stop.signum} after round "
                            f"{rounds_done}; resume with: {resume_command(out)}")
        print_final(out / RUN_FILE, digest, quiet)
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
        if injected(exc):  # a fault the config asked for: one sentence, the run marked failed
            raise UserError(f"the run stopped on the injected fault ({exc}); its status is now failed",
                            exit_code=13) from None
        raise
    finally:
        recorder.watch.done()  # no-op after failed()
        runner.close()
        if lock is not None:
            lock.release()


def run_context(config: BaseConfig, transport, exp: Experiment, runner: ClientRunner,
                defense: Defense) -> RunContext:
    """What this rank needs for the rounds: the rows' buffers, the path, the server's proxy set."""
    path, d = aggregation_path(config), runner.model.size
    recv = None
    if transport.is_server and path == "gather":  # the participants' rows, in host memory where the defense runs
        m = participants(config)
        recv = SendBlocks(weights=np.empty((m, d), np.float32),
                          fisher=np.empty((m, d), np.float32) if runner.blocks.fisher is not None else None,
                          meta=np.empty((m, len(META)), np.float64))
    return RunContext(
        config=config, transport=transport, exp=exp, runner=runner, defense=defense,
        blocks=client_blocks(config.data.num_clients, transport.size, config.train.batch_clients), path=path,
        parallel_eval=parallel_eval(config, transport.size), trainable=runner.model.trainable.cpu(),
        w_buffer=host_buffer((d,), np.float32, pinned=runner.device.cuda),
        proxy=server_proxy(config, exp) if transport.is_server and defense.needs_proxy else None, recv=recv,
        attack=runner.attack if transport.is_server and stage_needed(runner.attack) else None,
        round_trigger=RoundTrigger.make(runner.attack, exp, transport.is_server))


def initial_weights(config: BaseConfig) -> torch.Tensor:
    """w_0: the model initialised from the run's seed (on the CPU, whatever the device)."""
    return build_model(config.model.name, seeding.derive_seed(config.seed, seeding.MODEL_INIT)).flat.clone()


def server_proxy(config: BaseConfig, exp: Experiment) -> ProxyData:
    """The server's proxy set and training settings, for FLTrust, Sageflow and Finetuning."""
    sets = exp.eval_sets
    return ProxyData(
        x=model_input(sets.proxy_x).contiguous(), y=sets.proxy_y,
        make_model=lambda: build_model(config.model.name, 0), lr=config.train.lr, momentum=config.train.momentum,
        weight_decay=config.train.weight_decay, batch_size=config.train.batch_size,
        local_epochs=config.train.local_epochs, seed=seeding.derive_seed(config.seed, seeding.DEFENSE))


def shared_config(config: BaseConfig | Callable[[], BaseConfig], transport) -> tuple[BaseConfig | None, str | None]:
    """The config on every rank: given, or read by rank 0 and sent to the others as YAML."""
    if not callable(config):
        return config, None
    text, error = None, None
    if transport.is_server:
        try:
            text = to_yaml(config())
        except UserError as exc:
            error = str(exc)
    text, error = transport.share((text, error))
    return (from_yaml(text) if error is None else None), error


def injected(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a fault that ``runtime.fault`` injected."""
    while exc is not None:
        if isinstance(exc, InjectedFault):
            return True
        exc = exc.__cause__
    return False


def describe_launch(launch: Launch, ranks: int) -> str:
    """'clients on cuda (NVIDIA H200) with 1 thread(s) each[, 2 at a time]'."""
    fp = launch.fingerprint
    gpu = f" ({fp['gpu']})" if fp.get("gpu") else ""
    text = f"clients on {fp['device']}{gpu} with {fp['client_threads']} thread(s) each"
    return text + (f", {launch.workers} at a time" if ranks == 1 else "")


def ignore_stop_signals() -> None:
    """Client ranks let SIGTERM/SIGUSR1 pass: SLURM signals every task, the server coordinates the stop."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def print_final(path: Path, digest: str, quiet: bool) -> None:
    """The final figures as ``inspect`` gives them (store.read_summary), then the final sha."""
    if not quiet:
        from fdcr_mpi.store import read_summary

        summary = read_summary(path)

        def figure(key: str) -> str:
            value = summary.get(key)
            return "nan" if value is None else f"{value:.2f}"

        window = summary["final_window"]
        rounds_text = "the last round" if window == 1 else f"the last {window} rounds"
        print(f"final (mean of {rounds_text}): A {figure('final_A')}  R {figure('final_R')}  V {figure('final_V')}; "
              f"detection (mean over rounds): TPR {figure('tpr_mean')}  FPR {figure('fpr_mean')}")
    print(f"final model sha256: {digest}", flush=True)
    sys.stdout.flush()
