"""The sentinel: names the rank that died first when a job under MPI ends abnormally.

When a rank is SIGKILLed (OOM killer, a node's watchdog, ``kill -9``), MPICH's hydra at once
SIGKILLs every other rank and reports "BAD TERMINATION ... PID <pid>", where the pid is the
first process *it* saw end, often not the one that died first; no MPI rank lives to say
more. So rank 0, right after the ranks' identities are collected, starts one small watcher
process (not an MPI process, in its own session so that hydra's clean-up does not reach it)
that watches the pids of every rank **on rank 0's host** and learns, in order, when they end
(``pidfd_open`` + ``poll``, Linux >= 5.3; otherwise it polls ``/proc/<pid>`` every 50 ms).

Rank 0 talks to it through a pipe (the watcher's stdin): ``recorded N`` after each round is
recorded, ``failed MESSAGE`` just before rank 0 ends the job on an error of its own, and
``done`` on every orderly end (complete, ``Preempted``, user error), after which the watcher
exits silently. A client rank that raises leaves a note ``.failed-rank-R`` in the run
directory (time and message) before ending the job, so the rank that raised is named rather
than a rank that MPI then killed.

If the job ends without ``done``, the watcher names the first rank to end (or to report an
error), its clients, pid and host, and the round, in one line such as::

    fdcr-mpi: rank 2 (clients 5-9, pid 12345 on host vm) ended unexpectedly (it was the first
    rank to end) during round 3/20; the job was stopped. Resume with: fdcr-mpi resume runs/x

(on one line). Processes that end within the same wakeup are named together ("ranks 1 and 2
ended at the same time") rather than guessed. The line goes to ``<out>/failure.txt``
(written atomically), the dependable record, and to the watcher's stderr, inherited from
rank 0. Under MPICH's hydra that reaches the mpiexec caller's stderr, after hydra's own
"BAD TERMINATION" report: hydra forwards a rank's stderr until every process holding it has
closed it, so mpiexec returns only once the watcher has reported and exited (checked by the
dying-rank test). After ``MPI_Abort`` (a rank that raised) hydra does not wait, and other
launchers may not either, so the line can be lost there (a raising rank names itself on
stderr through ``fail_job``). ``fdcr-mpi inspect``
shows ``failure.txt``; the next ``run``/``resume`` of the directory prints it once and
renames it to ``failure.previous.txt``.

A rank's end is stamped at the first sign of it. Killed, a process closes its files (its MPI
sockets, which is how hydra learns of it and starts killing the others) a while before it has
ended (its pidfd turns ready), and on a busy node that while can be longer than hydra needs to
kill another rank. So every watched rank other than the watcher's own holds a *lifeline*: a
connection to an abstract Unix socket (``listen`` by the node's first rank before a collective,
``join`` by the node's other ranks after it) that the watcher accepts and knows by the peer's pid
(``SO_PEERCRED``). The lifeline's end-of-file and the leader's pipe closing are stamped as ends,
the pidfd only where it comes first; a rank whose lifeline could not connect is watched by its
pid alone.

Several nodes: the first rank of every other node starts a watcher of its own for the ranks of
its node (``watch_node``, told ``done`` by that rank on an orderly end). The first time one of
them sees a rank of its node end, it writes ``<out>/.sentinel-<node>.json`` (the time and the
ranks). Rank 0's watcher, before it reports, waits up to ``NODE_WAIT`` seconds for such records
and names the rank that ended first on any node, so the run directory must be on a file system
every node writes (the usual shared one). Ranks on a node whose watcher could not start are
named as not watched. Under SLURM, ``srun`` also names the task that died ("srun: error:
<host>: task 2: Killed"). One-process runs start no watcher.

The watcher never outlives rank 0 for long: it exits once it has reported, once rank 0 has
ended, or once every watched pid has ended; it only sleeps in ``poll`` and never writes to
``run.h5``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from fdcr_mpi.program import resume_command

FAILURE_FILE = "failure.txt"
PREVIOUS_FAILURE_FILE = "failure.previous.txt"
NOTE_PREFIX = ".failed-rank-"
NODE_RECORD = ".sentinel-"  # <out>/.sentinel-<node>.json: another node's first rank to end
NODE_WAIT = 3.0  # seconds rank 0's watcher waits for other nodes' records before it reports
GRACE_SECONDS = 10.0  # a client ended, rank 0 lives and says nothing: report after this long
PROC_POLL_MS = 50  # /proc polling period when pidfd_open is unavailable
LIFELINE_NAME = "fdcr-mpi-sentinel-"  # abstract socket names: this, then a digest of the leader's identity


# ----------------------------------------------------------------------------- rank 0's side


class Watch:
    """A rank's handle on its node's watcher: the leader's pipe to it (``fd``), another rank's
    lifeline to it (``lifeline``, a file descriptor left open until the process ends: an
    orderly end of the run, or the return of the driver, must not look like a death while MPI
    still finalises), or neither (every method a no-op)."""

    def __init__(self, proc: subprocess.Popen | None = None, fd: int | None = None,
                 lifeline: int | None = None) -> None:
        self.proc, self.fd, self.lifeline = proc, fd, lifeline

    @property
    def active(self) -> bool:
        """Whether a watcher was started (and not yet told to end)."""
        return self.fd is not None

    def tell(self, line: str) -> None:
        """Best effort and never blocking: a full pipe or a dead watcher only loses the line."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())

    def recorded(self, rounds_done: int) -> None:
        self.tell(f"recorded {rounds_done}")

    def failed(self, exc: BaseException) -> None:
        """Rank 0 is about to end the job on its own error."""
        self.tell(f"failed {_one_line(exc)}")
        self.close()

    def done(self) -> None:
        """An orderly end (complete, preempted, user error): the watcher exits silently."""
        self.tell("done")
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def begin_attempt(out: Path, identities: list[str], blocks: list[list[int]], rounds_done: int,
                  rounds: int, remote: list[int] | None = None, listener: socket.socket | None = None) -> Watch:
    """Rank 0, once the run directory is locked: report a previous failure, start the watcher.

    ``identities``: 'node:pid' of every rank; ``blocks``: the client ids of every rank; ``remote``:
    the ranks that the watchers of other nodes follow; ``listener``: from ``listen``, handed to
    the watcher. No watcher for a one-process run.
    """
    previous_attempt(out)
    if len(identities) < 2:
        if listener is not None:
            listener.close()
        return Watch()
    return _start(out, identities, blocks, {"role": "server", "leader": 0, "rounds_done": rounds_done,
                                             "rounds": rounds, "remote": remote or []}, listener)


def clear_records(out: Path) -> None:
    """Rank 0 at the start of an attempt: the notes and node records of earlier attempts go."""
    for stale in [*out.glob(NOTE_PREFIX + "*"), *out.glob(NODE_RECORD + "*")]:
        with contextlib.suppress(OSError):
            stale.unlink()


def watch_node(out: Path, identities: list[str], blocks: list[list[int]], leader: int,
               listener: socket.socket | None = None) -> Watch:
    """The first rank of a node other than rank 0's: start a watcher of the node's ranks."""
    return _start(out, identities, blocks, {"role": "node", "leader": leader}, listener)


def lifeline_address(identities: list[str], leader: int) -> str:
    """The abstract socket of the watcher that rank ``leader`` starts ('node:pid' is unique to it)."""
    return "\0" + LIFELINE_NAME + hashlib.sha256(identities[leader].encode()).hexdigest()[:32]


def listen(identities: list[str], leader: int) -> socket.socket | None:
    """A node's first rank, before a collective that its other ranks ``join`` after: the socket
    its watcher will accept their lifelines on (connections wait in the backlog until then).
    None where there are no abstract Unix sockets (not Linux): the pids are watched alone."""
    host = identities[leader].rsplit(":", 1)[0]
    local = sum(identity.rsplit(":", 1)[0] == host for identity in identities)
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(lifeline_address(identities, leader))
        sock.listen(local)
    except OSError:
        sock.close()
        return None
    return sock


def join(identities: list[str], leader: int) -> Watch:
    """Every rank of a node but its first, after the collective: hold a lifeline to the node's
    watcher until the process ends (the kernel closes it then; the descriptor is not inherited
    by programs the rank runs). Best effort: without it the pid is watched."""
    if not hasattr(socket, "AF_UNIX"):
        return Watch()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)  # a full backlog refuses rather than waits
    try:
        sock.connect(lifeline_address(identities, leader))
    except OSError:
        sock.close()
        return Watch()
    return Watch(lifeline=sock.detach())


def _start(out: Path, identities: list[str], blocks: list[list[int]], role: dict,
           listener: socket.socket | None = None) -> Watch:
    try:
        return _spawn(out, identities, blocks, role, listener)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        sys.stderr.write(f"fdcr-mpi: warning: no sentinel for this job's node ({exc})\n")
        return Watch()
    finally:
        if listener is not None:
            listener.close()  # the watcher holds its own copy


def _spawn(out: Path, identities: list[str], blocks: list[list[int]], role: dict,
           listener: socket.socket | None = None) -> Watch:
    leader = role["leader"]
    host = identities[leader].rsplit(":", 1)[0]
    own = _read(f"/proc/{os.getpid()}/cmdline")
    watched, elsewhere = {}, []
    for rank, (identity, ids) in enumerate(zip(identities, blocks)):
        where, pid = identity.rsplit(":", 1)
        label = "server" if rank == 0 else clients_label(ids)
        # Same node and the same program: a pid from another node or pid namespace is not ours.
        if where == host and (rank == leader or _read(f"/proc/{pid}/cmdline") == own):
            watched[rank] = [int(pid), label]
        elif rank not in role.get("remote", []):
            elsewhere.append(rank)
    spec = {"out": str(out), "host": host, "ranks": watched, "elsewhere": elsewhere, "rounds_done": 0,
            "rounds": 0, "resume": resume_command(out), **role,
            "listener": listener.fileno() if listener is not None else None}
    read_end, write_end = os.pipe()
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fdcr_mpi.runtime.sentinel", str(out), json.dumps(spec)],
            stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True, env=env, close_fds=True,
            pass_fds=(listener.fileno(),) if listener is not None else ())
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    os.set_blocking(write_end, False)
    return Watch(proc, write_end)


def clients_label(ids: list[int]) -> str:
    """'clients 5-9', 'client 3' or 'no clients' (the ids are a contiguous block)."""
    if not ids:
        return "no clients"
    if len(ids) == 1:
        return f"client {ids[0]}"
    return f"clients {ids[0]}-{ids[-1]}"


def note_failure(out: Path, rank: int, exc: BaseException) -> None:
    """A client rank about to end the job on its own error: leave the time and the error for the watcher."""
    with contextlib.suppress(OSError):
        _write_atomically(out / f"{NOTE_PREFIX}{rank}", f"{time.time():.6f} {_one_line(exc)}\n")


def previous_attempt(out: Path) -> None:
    """Print a previous attempt's failure line once, then move it aside."""
    path = out / FAILURE_FILE
    line = read_failure(out)
    if line is None:
        return
    sys.stderr.write(f"fdcr-mpi: previous attempt: {line.removeprefix('fdcr-mpi: ')}\n")
    sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.replace(path, out / PREVIOUS_FAILURE_FILE)


def read_failure(out: Path) -> str | None:
    """The failure line the watcher left in ``out``, or None."""
    try:
        text = (Path(out) / FAILURE_FILE).read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


# ----------------------------------------------------------------------------- the watcher


class Watcher:
    """Watches the pids of the ranks on rank 0's host and rank 0's messages; reports once."""

    def __init__(self, spec: dict) -> None:
        self.out = Path(spec["out"])
        self.host = spec["host"]
        self.ranks = {int(r): (int(pid), label) for r, (pid, label) in spec["ranks"].items()}
        self.elsewhere: list[int] = spec["elsewhere"]
        self.rounds_done, self.rounds = int(spec["rounds_done"]), int(spec["rounds"])
        self.resume = str(spec.get("resume") or f"fdcr-mpi resume {self.out}")
        self.node = spec.get("role", "server") == "node"  # a node's watcher only records its first end
        self.recorded = False
        self.leader = int(spec.get("leader", 0))  # the rank whose pipe this watcher reads
        self.record_path = self.out / f"{NODE_RECORD}{_safe(self.host)}.json"
        self.remote: list[int] = [int(r) for r in spec.get("remote", [])]  # ranks other nodes' watchers follow
        self.remote_described: dict[int, str] = {}
        self.started = time.time()
        self.events: list[tuple[float, list[int], str | None]] = []  # (time, ranks, error or None)
        self.done = False
        self.leader_ended = False
        self.gone: set[int] = set()  # ranks whose end is recorded (by lifeline, pipe or pidfd)
        self.buffer = b""
        self.listener = _adopt(spec.get("listener"))
        self.lifelines: dict[int, tuple[int, socket.socket]] = {}  # connection fd -> (rank, connection)

    # -- the loop

    def run(self) -> None:
        poller = select.poll()
        poller.register(0, select.POLLIN)
        pidfds: dict[int, int] = {}
        polled: dict[int, int] = {}  # /proc fallback: rank -> pid
        for rank, (pid, _) in self.ranks.items():
            try:
                fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
            except AttributeError:
                polled[rank] = pid
                continue
            except OSError:
                if _proc_alive(pid):
                    polled[rank] = pid
                continue  # ended before the watch began: not ours to judge
            pidfds[fd] = rank
            poller.register(fd, select.POLLIN)
        if self.listener is not None:
            poller.register(self.listener.fileno(), select.POLLIN)
        while pidfds or polled:
            ready = poller.poll(self._timeout_ms(bool(polled)))
            now = time.time()
            ended = []
            for fd, _ in ready:
                if fd == 0:
                    self._read_messages(poller, now)
                elif self.listener is not None and fd == self.listener.fileno():
                    self._accept(poller)
                elif fd in self.lifelines:  # nothing is ever sent on it: ready means closed
                    rank, conn = self.lifelines.pop(fd)
                    poller.unregister(fd)
                    conn.close()
                    ended.append(rank)
                elif fd in pidfds:
                    ended.append(pidfds.pop(fd))
                    poller.unregister(fd)
                    os.close(fd)
            for rank, pid in list(polled.items()):
                if not _proc_alive(pid):
                    ended.append(rank)
                    del polled[rank]
            ended = sorted(set(ended) - self.gone)  # the leader's from its pipe, a lifeline's before its pid
            self.gone.update(ended)
            if ended:  # before a message of the same wakeup (the leader failing because of this end)
                self.events.insert(self._index_of(now), (now, ended, None))
                self.leader_ended = self.leader_ended or self.leader in ended
            if self.node:
                if self.done:  # an orderly end: a record written on the way is withdrawn
                    with contextlib.suppress(OSError):
                        self.record_path.unlink()
                    return
                if self.events and not self.recorded:
                    self.write_record()
                    self.recorded = True  # once: rank 0's watcher removes it after its report
                if self.leader_ended:
                    return
                continue
            if self.done:
                return
            if self._should_report():
                self.report()
                return

    def _timeout_ms(self, polling: bool) -> int:
        timeout = -1
        if self.events and not self._ending():
            left = self.events[0][0] + GRACE_SECONDS - time.time()
            timeout = max(PROC_POLL_MS, int(left * 1000) + 1)
        if polling:
            timeout = PROC_POLL_MS if timeout < 0 else min(timeout, PROC_POLL_MS)
        return timeout

    def _index_of(self, now: float) -> int:
        return next((i for i, event in enumerate(self.events) if event[0] >= now), len(self.events))

    def _ending(self) -> bool:
        """Every round recorded: the client ranks now end normally."""
        return self.rounds_done >= self.rounds

    def _read_messages(self, poller: select.poll, now: float) -> None:
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            word, _, rest = raw.decode(errors="replace").partition(" ")
            if word == "recorded" and rest.isdigit():
                self.rounds_done = int(rest)
            elif word == "done":
                self.done = True
            elif word == "failed":
                self.events.append((now, [self.leader], rest))
                self.leader_ended = True  # it is ending the job now
                self.gone.add(self.leader)
        if not chunk:  # the leader closed the pipe: after 'done' or 'failed', or because it is ending
            if not self.done and not self.leader_ended:
                self.events.append((now, [self.leader], None))  # its pidfd may turn ready a moment later
                self.leader_ended = True
                self.gone.add(self.leader)
            poller.unregister(0)

    def _accept(self, poller: select.poll) -> None:
        """Take the lifelines waiting on the listener; each is known by its peer's pid."""
        by_pid = {pid: rank for rank, (pid, _) in self.ranks.items() if rank != self.leader}
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:  # none waiting
                return
            except OSError:  # the listener failed: the pids are still watched
                poller.unregister(self.listener.fileno())
                self.listener.close()
                self.listener = None
                return
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                rank = by_pid.get(struct.unpack("3i", creds)[0])
            except (OSError, struct.error):
                rank = None
            if rank is None or rank in self.gone:
                conn.close()
                continue
            self.lifelines[conn.fileno()] = (rank, conn)
            poller.register(conn.fileno(), select.POLLIN)

    def _should_report(self) -> bool:
        if self.leader_ended:
            return True
        return bool(self.events) and not self._ending() and time.time() >= self.events[0][0] + GRACE_SECONDS

    # -- the report

    def write_record(self) -> None:
        """A node's watcher: this node's first end, for rank 0's watcher to compare across nodes."""
        stamp, ranks, _ = self.events[0]
        record = {"time": stamp, "ranks": ranks, "described": {str(r): self.describe(r) for r in ranks}}
        with contextlib.suppress(OSError):
            _write_atomically(self.record_path, json.dumps(record))

    def remote_events(self) -> list[tuple[float, list[int], str | None]]:
        """Other nodes' first ends, from their watchers' records (their descriptions kept)."""
        events = []
        for path in self.out.glob(NODE_RECORD + "*.json"):
            try:
                record = json.loads(_read(str(path)) or "{}")
                ranks = [int(r) for r in record["ranks"]]
                self.remote_described.update({int(r): str(d) for r, d in record["described"].items()})
                events.append((float(record["time"]), ranks, None))
            except (KeyError, TypeError, ValueError):
                continue
        return events

    def await_remote(self) -> None:
        """Give the other nodes' watchers a moment to record what they saw (rank 0's watcher)."""
        if not self.remote:
            return
        deadline = time.time() + NODE_WAIT
        while time.time() < deadline and not self.remote_events():
            time.sleep(0.1)

    def culprit(self) -> tuple[float, list[int], str | None]:
        """The earliest event: a batch of ended ranks (on any node), rank 0's error or a client's note."""
        events = list(self.events) + self.remote_events()
        events = events or [(time.time(), [0], None)]
        for note in self.out.glob(NOTE_PREFIX + "*"):
            rank = note.name.removeprefix(NOTE_PREFIX)
            text = _read(str(note))
            stamp, _, message = text.strip().partition(" ")
            if rank.isdigit() and message:
                events.append((_float(stamp, self.started), [int(rank)], message))
        # An error reported before its process ended comes first; a tie goes to the end seen.
        return min(events, key=lambda e: (e[0], e[2] is not None))

    def describe(self, rank: int) -> str:
        if rank in self.ranks:
            pid, label = self.ranks[rank]
            return f"{label}, pid {pid} on host {self.host}"
        return self.remote_described.get(rank, "on another host")

    def message(self) -> str:
        _, ranks, error = self.culprit()
        if len(ranks) == 1:
            who = f"rank {ranks[0]} ({self.describe(ranks[0])})"
        else:
            names = ", ".join(str(r) for r in ranks[:-1]) + f" and {ranks[-1]}"
            who = f"ranks {names} ({'; '.join(f'rank {r}: {self.describe(r)}' for r in ranks)})"
        if error is not None:
            what = "failed"
        elif len(ranks) == 1:
            what = "ended unexpectedly (it was the first rank to end)"
        else:
            what = "ended at the same time (the first ranks to end)"
        when = (f"during round {self.rounds_done + 1}/{self.rounds}" if self.rounds_done < self.rounds
                else f"after the last round ({self.rounds}/{self.rounds})")
        detail = f": {error}" if error is not None else ""
        if self.elsewhere:
            detail += (f"; ranks {_span(self.elsewhere)} on other hosts were not watched"
                       if len(self.elsewhere) > 1 else f"; rank {self.elsewhere[0]} on another host was not watched")
        state = "the job was stopped" if self.leader_ended else "rank 0 is still running"
        return f"fdcr-mpi: {who} {what} {when}{detail}; {state}. Resume with: {self.resume}"

    def report(self) -> None:
        self.await_remote()
        line = self.message()
        with contextlib.suppress(OSError):
            _write_atomically(self.out / FAILURE_FILE, line + "\n")
        for note in [*self.out.glob(NOTE_PREFIX + "*"), *self.out.glob(NODE_RECORD + "*")]:
            with contextlib.suppress(OSError):
                note.unlink()
        with contextlib.suppress(OSError):
            os.write(2, (line + "\n").encode())  # rank 0's stderr, which the launcher forwards


# ----------------------------------------------------------------------------- helpers


def _adopt(fd: int | None) -> socket.socket | None:
    """The listening socket the watcher was handed (non-blocking), or None."""
    if fd is None:
        return None
    try:
        sock = socket.socket(fileno=int(fd))
    except OSError:
        return None
    sock.setblocking(False)
    return sock


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _float(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


def _safe(name: str) -> str:
    """A node name as a file name part."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "node"


def _span(ranks: list[int]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if ranks == list(range(ranks[0], ranks[-1] + 1)) else ", ".join(map(str, ranks))


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _proc_alive(pid: int) -> bool:
    """/proc fallback: a zombie (state Z, or X) has ended even though its pid is still there."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return False
    state = text.rpartition(")")[2].split()[:1]
    return bool(state) and state[0] not in ("Z", "X")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def main(argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the job's stop signals are rank 0's business
    spec = json.loads(argv[1])
    os.set_blocking(0, False)
    Watcher(spec).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
