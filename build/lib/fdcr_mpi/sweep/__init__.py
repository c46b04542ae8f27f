"""Sweeps: one YAML file, many runs (docs/SWEEPS.md): the file and its runs (``spec``), running
them here (``local``) or as a SLURM job array (``slurm``)."""

from fdcr_mpi.sweep.local import LocalRunner, Outcome, report_outcomes, run_command, run_local
from fdcr_mpi.sweep.slurm import (
    TEMPLATE,
    array_ranges,
    render_script,
    slurm_options,
    submit,
    write_job,
)
from fdcr_mpi.sweep.spec import (
    FINGERPRINT_ENV,
    ROOT_ENV,
    Run,
    SlurmOptions,
    Sweep,
    SweepSpec,
    expand,
    flatten,
    format_plan,
    format_value,
    load_sweep,
    pending,
    run_config,
    run_name,
    states,
    stored_state,
)

__all__ = ["FINGERPRINT_ENV", "ROOT_ENV", "TEMPLATE", "array_ranges", "format_value", "stored_state", "submit", "LocalRunner", "Outcome", "Run", "SlurmOptions", "Sweep", "SweepSpec",
           "expand", "flatten", "format_plan", "load_sweep", "pending", "render_script", "report_outcomes",
           "run_command", "run_config", "run_local", "run_name", "slurm_options", "states", "write_job"]
