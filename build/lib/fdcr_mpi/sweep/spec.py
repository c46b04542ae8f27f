"""Sweeps: one YAML file, many runs; run them here (``sweep local``) or as a SLURM job array.

A sweep file names a base config, fixed overrides and axes to cross (docs/SWEEPS.md)::

    name: small                     # job name; default out root runs/sweeps/<name>
    base: ../quickstart.yaml        # optional config file, relative to the sweep file
    out: runs/sweeps/small          # optional out root, relative to the working directory
    overrides: {rounds: 3}          # fixed dotted overrides (nested mappings are flattened)
    axes:                           # dotted key -> values, crossed in file order (last fastest)
      defense.name: [fedavg, fdcr]
      seed: [0, 1]
    exclude:                        # drop each run that matches every key of an entry
      - {defense.name: fedavg, seed: 1}
    labels: {seed: s}               # name parts are <label><value>; default label: last key part
    slurm: {ranks: 3, time: "01:00:00", throttle: 8}

Run ``i`` of the expansion has a readable name (``fdcr_s0``), its overrides and its own run
directory ``<out root>/<name>``; ``fdcr-mpi run --sweep FILE --index i`` runs it, so a SLURM
array task needs nothing but ``$SLURM_ARRAY_TASK_ID``. A run whose run file says ``complete``
is skipped; any other is resumed from its checkpoint by running it again.

Sweep files are shared between researchers, so nothing in one may run code or write outside
its out root: run names are single, plain directory names; the SLURM options are checked
against SLURM's own forms (``extra`` lines only from a list of sbatch options) and every path
in the job script is quoted or refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from fdcr_mpi.errors import UserError, describe_validation_error
from fdcr_mpi.store.schema import RUN_FILE

FINGERPRINT_ENV = "FDCR_SWEEP_FINGERPRINT"  # set by the runners: refuse a sweep file edited since
ROOT_ENV = "FDCR_SWEEP_ROOT"  # set by the runners: the out root they were given
Scalar = str | int | float | bool | None
_LAUNCHER_ENV_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDI_", "HYDRA_", "MPI_", "SLURM_STEP_")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 200  # run directory names stay well below the file systems' 255 bytes
# SLURM's forms: the time limit, names of partitions, accounts and QOS (comma lists), memory sizes.
_TIME = r"^(\d+-)?\d+(:\d+){0,2}$|^(UNLIMITED|INFINITE|unlimited|infinite)$"
_NAMES = r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$"
_WORD = r"^[A-Za-z0-9_.-]+$"
_MEMORY = r"^\d+[KMGTkmgt]?[Bb]?$"
# ``slurm.extra``: #SBATCH lines of these options only (none of them runs a program or sets the
# job's environment, as --export, --container or --get-user-env could), as --option or --option=value.
EXTRA_OPTIONS = frozenset({
    "begin", "comment", "constraint", "cores-per-socket", "cpus-per-gpu", "distribution", "exclude", "exclusive",
    "gpu-bind", "gpus", "gpus-per-node", "gpus-per-task", "gres", "hint", "licenses", "mail-type", "mail-user",
    "mem-per-cpu", "mem-per-gpu", "mincpus", "nice", "nodelist", "nodes", "ntasks-per-node", "oversubscribe",
    "reservation", "sockets-per-node", "spread-job", "switches", "threads-per-core", "tmp", "wckey",
})
_EXTRA = re.compile(r"^--([a-z][a-z-]*)(=[A-Za-z0-9_.,:/@%+=&|*\[\]-]+)?$")
UNSAFE_IN_DIRECTIVE = re.compile(r"[\s\"'\\\x00-\x1f\x7f]")


# ----------------------------------------------------------------------------- schema


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class SlurmOptions(_Strict):
    """Defaults for ``fdcr-mpi sweep slurm`` (each one can be overridden on the command line)."""

    ranks: int = pydantic.Field(3, ge=1)
    """MPI ranks per run: rank 0 (the server) and the client ranks."""
    nodes: int = pydantic.Field(1, ge=1)
    """Nodes per run; with more than one, the ranks go round the nodes (rank 0 on the first)."""
    cpus_per_task: int = pydantic.Field(1, ge=1)
    gpus: int = pydantic.Field(0, ge=0)
    """GPUs per node; the client ranks of a node take them in turn (docs/CLUSTER.md)."""
    time: str = "02:00:00"
    throttle: int = pydantic.Field(8, ge=1)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    mpi: str = "pmi2"
    signal_seconds: int = pydantic.Field(120, ge=1)
    extra: list[str] = []

    @pydantic.field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        return _matching(value, _TIME, "a SLURM time limit such as 02:00:00, 90 or 1-12:00:00")

    @pydantic.field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_names(cls, value: str | None) -> str | None:
        return None if value is None else _matching(value, _NAMES, "a SLURM name (letters, digits, . _ -), "
                                                    "or several joined by commas")

    @pydantic.field_validator("mem")
    @classmethod
    def _slurm_memory(cls, value: str | None) -> str | None:
        return None if value is None else _matching(value, _MEMORY, "a SLURM memory size such as 16G or 4000M")

    @pydantic.field_validator("mpi")
    @classmethod
    def _srun_plugin(cls, value: str) -> str:
        return _matching(value, _WORD, "an srun --mpi plugin name such as pmi2, pmix or none")

    @pydantic.field_validator("extra")
    @classmethod
    def _sbatch_options(cls, lines: list[str]) -> list[str]:
        for line in lines:
            form = _EXTRA.fullmatch(line)
            if form is None or form.group(1) not in EXTRA_OPTIONS:
                raise ValueError(f"{line!r} is not an sbatch option of the form --option or --option=value "
                                 f"among: {', '.join(sorted(EXTRA_OPTIONS))}")
        return lines

    @pydantic.model_validator(mode="after")
    def _a_rank_on_every_node(self) -> SlurmOptions:
        if self.nodes > self.ranks:
            raise ValueError(f"{self.nodes} nodes need at least {self.nodes} ranks (ranks is {self.ranks})")
        return self

    @property
    def ranks_per_node(self) -> int:
        """Task slots asked of each node: the ranks shared out over the nodes, rounded up."""
        return -(-self.ranks // self.nodes)


def _matching(value: str, pattern: str, what: str) -> str:
    """``value`` if it matches ``pattern``; a ValueError saying what was expected otherwise."""
    if not re.fullmatch(pattern, value):  # fullmatch: '$' alone would let a final newline through
        raise ValueError(f"it must be {what}")
    return value


class SweepSpec(_Strict):
    """A sweep file as written (see the module docstring)."""

    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    base: str | None = None
    out: str | None = None
    overrides: dict[str, Any] = {}
    axes: dict[str, list[Scalar]] = {}
    exclude: list[dict[str, Scalar | list[Scalar]]] = []
    labels: dict[str, str] = {}
    slurm: SlurmOptions = SlurmOptions()

    @pydantic.field_validator("labels")
    @classmethod
    def _plain_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, label in labels.items():
            if _NAME_CHARS.search(label):
                raise ValueError(f"the label {label!r} of {key!r} may hold only letters, digits and . _ + - "
                                 "(it becomes part of a directory name)")
        return labels


# ----------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class Run:
    """One run of a sweep."""

    index: int
    name: str
    values: dict[str, Scalar]  # this run's value on each axis
    overrides: tuple[str, ...]  # fixed overrides, then the axis values, as key=value
    out: Path


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep file and its runs, in index order."""

    path: Path
    spec: SweepSpec
    base: Path | None
    root: Path
    runs: tuple[Run, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, index: int) -> Run:
        """Run ``index``; a UserError naming the valid range otherwise."""
        if not 0 <= index < len(self.runs):
            raise UserError(f"--index {index} is out of range: {self.path} has {len(self.runs)} runs, "
                            f"indices 0 to {len(self.runs) - 1}")
        return self.runs[index]

    def fingerprint(self) -> str:
        """A hash of what each index means (base, name, overrides): a changed file changes it."""
        data = [str(self.base), *[[r.name, *r.overrides] for r in self.runs]]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def format_value(value: Any) -> str:
    """A value as the right-hand side of a dotted override that parses back to the same value."""
    if isinstance(value, str):
        plain = bool(value) and not re.search(r"[\s,\[\]{}'\"=#:$\\]", value)
        if plain and _parses_as(value) == value:
            return value
        return "'" + value.replace("'", "''") + "'"  # YAML single quotes: only ' is escaped
    return json.dumps(value)


def _parses_as(text: str) -> Any:
    """What OmegaConf makes of ``key=text`` (the parser ``fdcr-mpi run`` uses)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"k={text}"]))["k"]
    except Exception:  # noqa: BLE001 - anything it cannot parse gets quoted
        return None


def _label(key: str, labels: Mapping[str, str]) -> str:
    """The name prefix of an axis: the sweep's label, else none for names/datasets, else the last part."""
    if key in labels:
        return labels[key]
    parts = key.split(".")
    return "" if parts[-1] in ("name", "dataset") else parts[-1]


def run_name(values: Mapping[str, Scalar], labels: Mapping[str, str]) -> str:
    """A readable, file-system safe name: <label><value> per axis, joined by '_'.

    Always one plain directory name inside the out root: never '.', '..' or longer than MAX_NAME.
    """
    parts = [_NAME_CHARS.sub("-", _label(key, labels)) + _NAME_CHARS.sub("-", str(value))
             for key, value in values.items()]
    name = "_".join(parts) or "run"
    if set(name) == {"."}:
        raise UserError(f"the run {dict(values)} gets the name {name!r}, which is not a directory of its own; "
                        "give its axes labels")
    if len(name) > MAX_NAME:
        raise UserError(f"the run {dict(values)} gets a name of {len(name)} characters (at most {MAX_NAME}); "
                        "use shorter values or labels")
    return name


def _matches(values: Mapping[str, Scalar], rule: Mapping[str, Any]) -> bool:
    for key, wanted in rule.items():
        choices = wanted if isinstance(wanted, list) else [wanted]
        if not any(_same(values[key], c) for c in choices):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    """Equality that tells True from 1 (YAML gives both)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _check_spec(spec: SweepSpec, path: Path) -> dict[str, Any]:
    """Cross-field checks; returns the flattened fixed overrides."""
    fixed = flatten(spec.overrides)
    for key, values in spec.axes.items():
        if not values:
            raise UserError(f"axis '{key}' of {path} has no values")
        if key in fixed:
            raise UserError(f"'{key}' is both a fixed override and an axis in {path}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise UserError(f"axis '{key}' of {path} lists a value twice")
    for rule in spec.exclude:
        unknown = [k for k in rule if k not in spec.axes]
        if not rule or unknown:
            raise UserError(f"exclusion {rule} of {path} must name axes only (axes: {', '.join(spec.axes)})")
    return fixed


def expand(spec: SweepSpec, path: Path, root: Path) -> tuple[Run, ...]:
    """Every run of the cross product, in stable order, minus the exclusions."""
    fixed = _check_spec(spec, path)
    base = [f"{k}={format_value(v)}" for k, v in fixed.items()]
    keys = list(spec.axes)
    runs: list[Run] = []
    seen: dict[str, dict[str, Scalar]] = {}
    for combo in itertools.product(*spec.axes.values()):
        values = dict(zip(keys, combo))
        if any(_matches(values, rule) for rule in spec.exclude):
            continue
        name = run_name(values, spec.labels)
        if name in seen:
            raise UserError(f"runs {seen[name]} and {values} of {path} get the same name {name!r}; "
                            "give the axes distinct labels")
        seen[name] = values
        overrides = (*base, *[f"{k}={format_value(v)}" for k, v in values.items()])
        runs.append(Run(len(runs), name, values, overrides, root / name))
    if not runs:
        raise UserError(f"{path} excludes every run")
    return tuple(runs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one: a second ``axes:`` block would silently replace the first)."""


def _mapping_without_repeats(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
            key = loader.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _read_spec(path: Path) -> SweepSpec:
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError, OSError, RecursionError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"sweep file {path} is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file {path} must be a mapping (name:, base:, overrides:, axes:, ...)")
    try:
        return SweepSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        message = describe_validation_error(exc).replace("config key", "sweep key")
        raise UserError(f"{path}: {message}") from None
    except RecursionError:
        raise UserError(f"sweep file {path} is nested too deeply") from None


def load_sweep(path: str | Path, out_root: str | Path | None = None) -> Sweep:
    """Read, check and expand a sweep file (the runs' configs are not validated here)."""
    path = Path(path).resolve()
    spec = _read_spec(path)
    base = (path.parent / spec.base).resolve() if spec.base else None
    if base is not None and not base.is_file():
        raise UserError(f"the base config {spec.base} of {path} does not exist ({base})")
    root = Path(out_root or spec.out or Path("runs") / "sweeps" / spec.name).absolute()
    return Sweep(path, spec, base, root, expand(spec, path, root))


# ----------------------------------------------------------------------------- state of the runs


def run_config(sweep: Sweep, run: Run) -> Any:
    """The run's validated config; a UserError naming the run otherwise."""
    from fdcr_mpi.config import load_config

    try:
        return load_config(sweep.base, list(run.overrides), warn_unused=False)
    except UserError as exc:
        raise UserError(f"run {run.index} ({run.name}) of {sweep.path}: {exc}") from None


def stored_state(out: Path) -> tuple[str, str | None]:
    """(status, config hash) of the run file in ``out``: status 'todo' when there is none,
    'unreadable' (with a warning) when it is damaged."""
    from fdcr_mpi.store import RunFileWarning, stored_status

    path = out / RUN_FILE
    try:
        if not path.is_file():
            return "todo", None
        return stored_status(path)
    except (UserError, OSError) as exc:
        warnings.warn(f"{exc}", RunFileWarning, stacklevel=2)
        return "unreadable", None


def states(sweep: Sweep) -> list[str]:
    """Each run's state: todo, running, preempted, failed, complete, unreadable or other-config.

    Validates every run's config on the way (a bad value stops here, before any job starts),
    and refuses two runs of one config (e.g. ``seed: [1, true]``: YAML's true is the seed 1).
    """
    from fdcr_mpi.config import config_hash

    result = []
    seen: dict[str, Run] = {}
    for run in sweep.runs:
        expected = config_hash(run_config(sweep, run))
        if expected in seen:
            first = seen[expected]
            raise UserError(f"runs {first.index} ({first.name}) and {run.index} ({run.name}) of {sweep.path} are "
                            "the same config; an axis lists one value twice in two spellings (such as 1 and true)")
        seen[expected] = run
        status, stored = stored_state(run.out)
        result.append("other-config" if stored is not None and stored != expected else status)
    return result


def check_no_conflicts(sweep: Sweep, run_states: Sequence[str]) -> None:
    """A run directory holding a run of another config cannot be resumed: stop before starting."""
    bad = [r for r, s in zip(sweep.runs, run_states) if s == "other-config"]
    if bad:
        raise UserError(f"{len(bad)} run directories hold a run of another config (first: {bad[0].out}); "
                        "the sweep file changed since they ran: move them away or use another out root")


def pending(sweep: Sweep, run_states: Sequence[str]) -> list[Run]:
    """The runs still to do (anything not complete), in index order."""
    return [r for r, s in zip(sweep.runs, run_states) if s != "complete"]


def format_plan(sweep: Sweep, run_states: Sequence[str]) -> str:
    """The plan as aligned text: index, state, name, run directory; then a one-line summary."""
    width = max(len(r.name) for r in sweep.runs)
    lines = [f"{'INDEX':>5}  {'STATE':<12}  {'NAME':<{width}}  OUT"]
    for run, state in zip(sweep.runs, run_states):
        lines.append(f"{run.index:>5}  {state:<12}  {run.name:<{width}}  {run.out}")
    done = sum(s == "complete" for s in run_states)
    lines.append(f"{len(sweep.runs)} runs in {sweep.path.name} (axes: {', '.join(sweep.spec.axes) or 'none'}): "
                 f"{done} complete, {len(sweep.runs) - done} to do; out root {sweep.root}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- local runner
