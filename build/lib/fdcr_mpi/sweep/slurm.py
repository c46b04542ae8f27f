"""``fdcr-mpi sweep slurm``: a sweep as a SLURM job array (fdcr_mpi/sweep/sweep.sbatch.tmpl), and its submission.

Every value of the sweep file that reaches the script is checked against SLURM's own forms
(``spec.SlurmOptions``) or quoted for the shell; none is ever run as code.
"""

from __future__ import annotations

import itertools
import shlex
import shutil
import string
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pydantic

from fdcr_mpi.errors import UserError, describe_validation_error
from fdcr_mpi.sweep.spec import (
    FINGERPRINT_ENV,
    ROOT_ENV,
    UNSAFE_IN_DIRECTIVE,
    Run,
    SlurmOptions,
    Sweep,
    check_no_conflicts,
    pending,
    states,
)

TEMPLATE = Path(__file__).resolve().parent / "sweep.sbatch.tmpl"  # package data: there in a wheel too


def array_ranges(indices: Iterable[int]) -> str:
    """Sorted indices as a SLURM array list: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    values = sorted(set(indices))
    parts = []
    for _, group in itertools.groupby(enumerate(values), key=lambda p: p[1] - p[0]):
        block = [v for _, v in group]
        parts.append(str(block[0]) if len(block) == 1 else f"{block[0]}-{block[-1]}")
    return ",".join(parts)


def job_name(sweep: Sweep) -> str:
    return f"fdcr-{sweep.name}"


def _directives(options: SlurmOptions) -> list[str]:
    lines = []
    for flag, value in (("partition", options.partition), ("account", options.account),
                        ("qos", options.qos), ("mem", options.mem)):
        if value:
            lines.append(f"--{flag}={value}")
    lines.append(f"--nodes={options.nodes}")
    if options.nodes > 1:
        lines.append(f"--ntasks-per-node={options.ranks_per_node}")
    if options.gpus:
        lines.append(f"--gres=gpu:{options.gpus}")
    lines += options.extra
    return [f"#SBATCH {line}" for line in lines]


def _directive_path(path: Path, what: str) -> str:
    """``path`` as it may stand in an #SBATCH line (which cannot quote): no blanks, quotes or control characters."""
    text = str(path)
    if UNSAFE_IN_DIRECTIVE.search(text):
        raise UserError(f"the {what} {text!r} cannot go into an #SBATCH line (it holds a blank, a quote, a "
                        "backslash or a control character); choose another path")
    return text


def render_script(sweep: Sweep, indices: Sequence[int], options: SlurmOptions, *,
                  data_root: str | None = None, template: Path = TEMPLATE, workdir: Path | None = None) -> str:
    """The sbatch script for the array of ``indices`` from the template in jobs/.

    Every value from the sweep file is either checked against a strict form (``SlurmOptions``,
    the sweep's name) or a path, quoted for the shell (``shlex.quote``) or, in #SBATCH lines,
    refused if it holds anything but plain characters.
    """
    if not template.is_file():
        raise UserError(f"the job template {template} does not exist (pass --template)")
    run_args = ""
    if data_root:
        run_args += f" --data-root {shlex.quote(str(Path(data_root).absolute()))}"
    values = {
        "sweep_name": sweep.name,
        "job_name": job_name(sweep),
        "array": f"{array_ranges(indices)}%{options.throttle}",
        "count": str(len(indices)),
        "ranks": str(options.ranks),
        "cpus_per_task": str(options.cpus_per_task),
        "time": options.time,
        "signal_seconds": str(options.signal_seconds),
        "log_dir": _directive_path(sweep.root / "slurm", "out root"),
        "workdir": _directive_path((workdir or Path.cwd()).absolute(), "working directory"),
        "directives": "\n".join(_directives(options)),
        "fingerprint": sweep.fingerprint(),
        "fingerprint_env": FINGERPRINT_ENV,
        "root_env": ROOT_ENV,
        "root": shlex.quote(str(sweep.root)),
        "mpi": shlex.quote(options.mpi),
        "distribution": " --distribution=cyclic" if options.nodes > 1 else "",
        "python": shlex.quote(sys.executable),
        "sweep_file": shlex.quote(str(sweep.path)),
        "run_args": run_args,
    }
    try:
        return string.Template(template.read_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise UserError(f"the job template {template} has an unknown or bad placeholder: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read the job template {template}: {exc.strerror or exc}") from None


def queued_indices(sweep: Sweep) -> set[int]:
    """Array indices of this sweep's job name that SLURM still has pending or running (empty if unknown)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return set()
    try:
        result = subprocess.run([squeue, "-h", "-r", "-n", job_name(sweep), "-t", "PENDING,RUNNING,REQUEUED",
                                 "-o", "%K"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if result.returncode != 0:
        return set()
    return {int(line) for line in result.stdout.split() if line.isdigit()}


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(f"sbatch is not on PATH (is this a SLURM login node?); the script is {script}")
    try:
        result = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError("sbatch did not answer within 60 s; is slurmctld up?") from None
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"sbatch refused {script}: {reason}")
    return result.stdout.strip().split(";")[0]


def slurm_options(sweep: Sweep, **overrides: Any) -> SlurmOptions:
    """The sweep file's slurm section with the command line's non-None values on top."""
    update = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SlurmOptions.model_validate({**sweep.spec.slurm.model_dump(), **update})
    except pydantic.ValidationError as exc:
        raise UserError(describe_validation_error(exc, "slurm").replace("config key", "option")) from None


def write_job(sweep: Sweep, options: SlurmOptions, *, script: Path | None = None, data_root: str | None = None,
              template: Path = TEMPLATE, skip_queued: bool = False) -> tuple[Path | None, list[Run], str]:
    """Write the array script for the runs still to do; (script or None, its runs, a message)."""
    run_states = states(sweep)
    check_no_conflicts(sweep, run_states)
    unfinished = pending(sweep, run_states)
    queued = queued_indices(sweep) if skip_queued else set()
    todo = [r for r in unfinished if r.index not in queued]
    summary = f"{len(sweep.runs)} runs: {len(sweep.runs) - len(unfinished)} complete"
    if queued:
        summary += f", {len(queued)} already queued or running"
    if not todo:
        return None, [], f"{summary}; nothing to submit"
    script = script or sweep.root / "slurm" / f"{sweep.name}.sbatch"
    text = render_script(sweep, [r.index for r in todo], options, data_root=data_root, template=template)
    try:
        for folder in (script.parent, sweep.root / "slurm"):  # the script's, and the logs' (SLURM won't create it)
            folder.mkdir(parents=True, exist_ok=True)
        script.write_text(text)
        script.chmod(0o755)
    except OSError as exc:
        raise UserError(f"cannot write the job script {script}: {exc.strerror or exc}") from None
    return script, todo, f"{summary}, {len(todo)} to run: wrote {script} (array {array_ranges(r.index for r in todo)})"
