"""Hostile inputs to the command line (issue 19): each ends in one sentence or its documented
behaviour, never runs injected text, never writes outside its root.

Sweep files are shared between researchers: a SLURM script written from one never executes
anything it carries (it is generated, then run with ``srun``/``scontrol`` replaced by
recorders), and no run directory escapes the out root. Configs, unwritable outputs,
unreadable data and closed pipes end in one sentence or quietly.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fdcr_mpi.cli import main
from fdcr_mpi.config import INT_LIMIT, BaseConfig, load_config
from fdcr_mpi.errors import UserError
from fdcr_mpi.sweep import load_sweep
from tests.adversarial_tools import FDCR, TINY, denied, env, run_worker, tally, verdict
from tests.test_sweep import fake_run

__all__ = ["tally"]  # the session fixture, imported for pytest

MARK = "pwned"  # what injected text would create


def sweep_file(path: Path, **fields: object) -> Path:
    overrides = dict(item.split("=", 1) for item in TINY)
    data = {"name": "hostile", "out": str(path.parent / "root"), "overrides": {**overrides, "rounds": 1},
            "axes": {"seed": [0, 1]}, **fields}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def marks(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob(f"*{MARK}*") if p.name == MARK]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """``fdcr-mpi ARGV`` in this process (the command line's own ``main``): (exit code, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- SLURM scripts

REFUSED_SLURM = {
    "mpi with $(...)": {"slurm": {"mpi": f"pmi2 $(touch {MARK})"}},
    "time with a new line": {"slurm": {"time": f"01:00:00\ntouch {MARK}"}},
    "time with a trailing new line": {"slurm": {"time": "01:00:00\n"}},
    "partition with ;": {"slurm": {"partition": f"gpu;touch {MARK}"}},
    "account with backticks": {"slurm": {"account": f"`touch {MARK}`"}},
    "qos with a new line": {"slurm": {"qos": f"normal\ntouch {MARK}"}},
    "mem with $(...)": {"slurm": {"mem": f"16G$(touch {MARK})"}},
    "extra with a new line": {"slurm": {"extra": [f"--constraint=a100\ntouch {MARK}"]}},
    "extra --export": {"slurm": {"extra": ["--export=ALL,LD_PRELOAD=/tmp/evil.so"]}},
    "extra --wrap": {"slurm": {"extra": [f"--wrap=touch{MARK}"]}},
    "extra not an option": {"slurm": {"extra": [f"#SBATCH --x\ntouch {MARK}"]}},
    "out with a new line": {"out": f"root\ntouch {MARK}"},
    "out with a blank": {"out": "root dir"},
    "out with a quote": {"out": "root'x"},
}


@pytest.mark.parametrize("case", sorted(REFUSED_SLURM))
def test_a_hostile_slurm_section_is_refused_in_one_sentence(tmp_path: Path, monkeypatch, capsys, case: str,
                                                           tally) -> None:
    monkeypatch.chdir(tmp_path)
    path = sweep_file(tmp_path / "s.yaml", **REFUSED_SLURM[case])
    script = tmp_path / "job.sbatch"
    code, err = cli(capsys, "sweep", "slurm", str(path), "--script", str(script))
    outcome = verdict(code, err)
    tally.record("hostile sweep file: sweep slurm", case, outcome)
    assert outcome == "clean error" and code == 2, err
    assert not script.exists() and not marks(tmp_path)


@pytest.mark.parametrize("option", [["--time", f"1:00:00;touch {MARK}"], ["--partition", f"a b$(touch {MARK})"],
                                    ["--mpi", f"pmi2;touch {MARK}"], ["--mem", "1G\n"]])
def test_hostile_slurm_options_on_the_command_line_are_refused(tmp_path: Path, monkeypatch, capsys,
                                                               option: list[str], tally) -> None:
    monkeypatch.chdir(tmp_path)
    path = sweep_file(tmp_path / "s.yaml")
    code, err = cli(capsys, "sweep", "slurm", str(path), "--script", str(tmp_path / "job.sbatch"), *option)
    outcome = verdict(code, err)
    tally.record("hostile sweep slurm option", option[0], outcome)
    assert outcome == "clean error", err
    assert not (tmp_path / "job.sbatch").exists() and not marks(tmp_path)


FAKE_COMMAND = """#!/bin/sh
printf '%s\\n' "$(basename "$0")" "$@" >> "$RECORD"
"""

ACCEPTED_SLURM = {  # relative out roots: below the working directory the script is run in
    "out root with $(...)": {"out": f"root/a$(touch${{IFS}}{MARK})b"},
    "out root with backticks and ;": {"out": f"root/;`touch${{IFS}}{MARK}`;"},
    "extra options, lists, a long time": {"slurm": {"extra": ["--constraint=a100&nvlink", "--exclusive"],
                                                    "partition": "gpu,cpu", "time": "1-00:00:00", "mem": "16G"}},
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_SLURM))
def test_a_generated_script_runs_without_executing_anything_from_the_sweep_file(tmp_path: Path, monkeypatch, capsys,
                                                                               case: str, tally) -> None:
    """The script is written, checked by ``bash -n`` and run with srun and scontrol recorded."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    path = sweep_file(workdir / f"s$(touch${{IFS}}{MARK}).yaml", **ACCEPTED_SLURM[case])
    script = tmp_path / "job.sbatch"
    data_root = f"/data/$(touch${{IFS}}{MARK})"
    code, err = cli(capsys, "sweep", "slurm", str(path), "--script", str(script), "--data-root", data_root)
    assert code == 0, err
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        (fake / name).write_text(FAKE_COMMAND)
        (fake / name).chmod(0o755)
    record = tmp_path / "record"
    task = {**env(), "PATH": f"{fake}:{os.environ['PATH']}", "RECORD": str(record), "SLURM_ARRAY_TASK_ID": "1",
            "SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_ID": "8", "SLURM_CPUS_PER_TASK": "1"}
    ran = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=task, cwd=workdir)
    assert ran.returncode == 0, ran.stderr
    words = record.read_text().splitlines()
    assert words[0] == "srun" and words[words.index("--sweep") + 1] == str(path.resolve())
    assert words[words.index("--index") + 1] == "1" and words[words.index("--data-root") + 1] == data_root
    root = workdir / ACCEPTED_SLURM[case].get("out", "root")
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert f"#SBATCH --output={root}/slurm/%A_%a.out" in directives
    assert not marks(tmp_path, root, Path("/data"))
    tally.record("hostile sweep file: script run", case, "ok")


# ----------------------------------------------------------------------------- run directories


ESCAPES = {
    "label with ../": {"labels": {"seed": "../../x_"}},
    "absolute label": {"labels": {"seed": "/tmp/abs"}},
    "label with a slash": {"labels": {"seed": "a/b"}},
    "value .. with an empty label": {"axes": {"data.root": ["..", "."]}, "labels": {"data.root": ""}},
    "label .. with an empty value": {"axes": {"data.root": [""]}, "labels": {"data.root": ".."}},
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_no_run_directory_escapes_the_out_root(tmp_path: Path, monkeypatch, capsys, case: str, tally) -> None:
    monkeypatch.chdir(tmp_path)
    path = sweep_file(tmp_path / "s.yaml", **ESCAPES[case])
    for command in (["sweep", "plan", str(path)], ["run", "--sweep", str(path), "--index", "0", "--restart"]):
        code, err = cli(capsys, *command)
        outcome = verdict(code, err)
        tally.record("hostile sweep file: run directory", f"{case}: {command[0]}", outcome)
        assert outcome == "clean error", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_restart_through_a_hostile_label_deletes_nothing_outside_the_root(tmp_path: Path, monkeypatch, capsys,
                                                                          tally) -> None:
    """labels: {seed: ../victim} made run 0's directory root/../victim0: --restart deleted its run."""
    victim = tmp_path / "victim0"
    fake_run(victim, ["data.dataset=digits", "rounds=2"], a=[1.0, 2.0], r=[3.0, 4.0])
    (victim / "checkpoints").mkdir()
    (victim / "checkpoints" / "round_0001.h5").write_bytes(b"someone's checkpoint")
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    path = sweep_file(tmp_path / "s.yaml", labels={"seed": "../victim"})
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "run", "--sweep", str(path), "--index", "0", "--restart")
    tally.record("hostile sweep file: run directory", "--restart through ../", verdict(code, err))
    assert verdict(code, err) == "clean error", err
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.dictionaries(st.sampled_from(["seed", "data.root", "defense.name"]), names, max_size=3),
       roots=st.lists(st.one_of(names, st.sampled_from(["..", ".", "/", "../..", "/etc", "~"])), min_size=1,
                      max_size=3, unique=True))
def test_every_run_directory_is_a_plain_child_of_the_root(tmp_path: Path, labels: dict, roots: list, tally) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "h", "out": str(tmp_path / "root"), "labels": labels,
                                    "axes": {"data.root": roots, "seed": [0]}}))
    try:
        sweep = load_sweep(path)
    except UserError as exc:
        tally.record("random labels and values (hypothesis)", repr((labels, roots)), verdict(2, f"fdcr-mpi: error: {exc}"))
        assert "\n" not in str(exc)
        return
    for run in sweep.runs:
        assert run.out.parent == sweep.root and run.out.name not in (".", "..") and "/" not in run.out.name
    tally.record("random labels and values (hypothesis)", repr((labels, roots)), "ok")


# ----------------------------------------------------------------------------- sweep files


def test_sweep_files_that_used_to_slip_through(tmp_path: Path, monkeypatch, capsys, tally) -> None:
    monkeypatch.chdir(tmp_path)
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("name: d\naxes:\n  seed: [0, 1]\naxes:\n  data.beta: [0.5]\n")
    same = sweep_file(tmp_path / "same.yaml", axes={"seed": [1, True]})
    config = tmp_path / "c.yaml"
    config.write_text("rounds: 1\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: n\noverrides:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(500))
                    + "  " * 501 + "v: 1\n")
    deep_axis = sweep_file(tmp_path / "deep_axis.yaml", overrides={".".join(["a"] * 300): 1})
    cases = {
        "a second axes: block": (["sweep", "plan", str(duplicate)], "given twice"),
        "seed: [1, true]": (["sweep", "plan", str(same)], "the same config"),
        "run CONFIG --sweep F --index I": (["run", str(config), "--sweep", str(same), "--index", "0"],
                                           "takes no config file"),
        "overrides 500 levels deep": (["sweep", "plan", str(deep)], "sweep file"),
        "an override key of 300 parts": (["sweep", "plan", str(deep_axis)], "300 parts"),
    }
    for case, (command, words) in cases.items():
        code, err = cli(capsys, *command)
        outcome = verdict(code, err)
        tally.record("hostile sweep file: content", case, outcome)
        assert outcome == "clean error" and words in err, (case, err)


# ----------------------------------------------------------------------------- configs

CONFIG_INPUTS = {
    "seed=-1": "seed", "crfl.seed=-1": "crfl.seed", "rounds=1e23": "rounds", "rounds=10000000": "rounds",
    "train.lr=.inf": "train.lr", "trigger.value=.nan": "trigger.value", "attack.scale=.inf": "attack.scale",
    "data.beta=1e309": "data.beta", "data.num_clients=2147483647": "data.num_clients",
    "eval.batch_size=100000000000": "eval.batch_size",
    ".".join(["k"] * 500) + "=1": "500 parts",
    "train.batch_size=100000": "train.batch_size",  # larger than every client: no training step at all
}


@pytest.mark.parametrize("item", sorted(CONFIG_INPUTS))
def test_config_values_that_used_to_slip_through(tmp_path: Path, capsys: pytest.CaptureFixture, item: str,
                                                 tally) -> None:
    code = main(["run", "data.dataset=digits", "rounds=1", item, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    outcome = verdict(code, err)
    tally.record("config value", item[:40], outcome)
    assert outcome == "clean error" and CONFIG_INPUTS[item] in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def numeric_keys() -> list[tuple[str, type]]:
    """Every int or float key of the config, the defenses' sections included."""
    found: list[tuple[str, type]] = []

    def walk(prefix: str, section: BaseModel) -> None:
        for name, field in type(section).model_fields.items():
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                walk(f"{prefix}{name}.", value)
            elif "int" in str(field.annotation) or "float" in str(field.annotation):
                found.append((f"{prefix}{name}", field.annotation))

    walk("", load_config(None))
    return found


NUMERIC = [key for key, _ in numeric_keys()]
extremes = st.one_of(st.sampled_from(["-1", "0", "1e23", "-1e23", ".inf", "-.inf", ".nan", "1e309", "2147483647",
                                      "2147483648", "-2147483648", "9223372036854775808", str(10**40), "1e-320"]),
                     st.integers(-(2**70), 2**70).map(str), st.floats().map(repr))


def within_limits(section: BaseModel) -> bool:
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            if not within_limits(value):
                return False
        elif isinstance(value, float) and not math.isfinite(value):
            return False
        elif isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_LIMIT or (name == "seed" and value < 0):
                return False
    return True


@settings(max_examples=400, deadline=None)
@given(items=st.lists(st.tuples(st.sampled_from(NUMERIC), extremes), min_size=1, max_size=3))
def test_extreme_numbers_give_a_config_within_limits_or_one_sentence(items: list[tuple[str, str]], tally) -> None:
    try:
        config = load_config(None, [f"{k}={v}" for k, v in items])
    except UserError as exc:
        tally.record("extreme numbers (hypothesis)", repr(items), verdict(2, f"fdcr-mpi: error: {exc}"))
        assert str(exc) and "\n" not in str(exc)
    else:
        tally.record("extreme numbers (hypothesis)", repr(items), "ok")
        assert isinstance(config, BaseConfig) and within_limits(config)


# ----------------------------------------------------------------------------- outputs and inputs


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake_run(root / f"s{seed}", ["data.dataset=fmnist", f"seed={seed}", "rounds=3"], a=[1.0, 2.0, 3.0],
                 r=[4.0, 5.0, 6.0], per_client=True)
    return root


def read_only(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return path


def test_unwritable_outputs_are_one_sentence(tmp_path: Path, runs: Path, tally) -> None:
    """Run in one worker under ``denied()``, where a read-only folder is read-only even for root."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    binary = tmp_path / "table4.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    locked = read_only(tmp_path / "locked")
    sweep = sweep_file(tmp_path / "s.yaml")
    cases = {
        "report --out on a file": ["report", str(runs), "--out", str(a_file)],
        "report --out read-only": ["report", str(runs), "--out", str(locked / "report")],
        "plot --out read-only": ["plot", str(runs), "--out", str(locked / "figures")],
        "report --reference binary": ["report", str(runs), "--reference", str(binary)],
        "report --reference a folder": ["report", str(runs), "--reference", str(tmp_path)],
        "sweep slurm --script on a folder": ["sweep", "slurm", str(sweep), "--script", str(tmp_path)],
        "sweep slurm --out-root read-only": ["sweep", "slurm", str(sweep), "--out-root", str(locked / "r")],
        "sweep local --out-root read-only": ["sweep", "local", str(sweep), "--out-root", str(locked / "r")],
        "inspect a folder without a run": ["inspect", str(tmp_path)],
    }
    try:
        results = run_worker([{"id": case, "argv": argv} for case, argv in cases.items()], prefix=denied())
    finally:
        locked.chmod(0o755)
    assert [r["id"] for r in results] == list(cases)
    for result in results:
        outcome = verdict(result["code"], result["stderr"], result["escaped"])
        tally.record("unwritable output", result["id"], outcome)
        assert outcome == "clean error", result
    assert sorted(p.name for p in locked.iterdir()) == []


@pytest.fixture(scope="module")
def mnist_copy(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """The four MNIST files, copied so that their modes can be changed."""
    root = tmp_path_factory.mktemp("data")
    (root / "MNIST" / "raw").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        shutil.copy(shared_data / "MNIST" / "raw" / name, root / "MNIST" / "raw" / name)
    return root


def test_unreadable_data_is_one_sentence(tmp_path: Path, mnist_copy: Path, tally) -> None:
    """Permission denied on a file, on raw/ or on the root: three data roots (hard links to one copy)."""
    roots = {}
    for target in ("a file", "raw/", "the root"):
        root = tmp_path / target.replace("/", "").replace(" ", "-")
        (root / "MNIST" / "raw").mkdir(parents=True)
        for file in (mnist_copy / "MNIST" / "raw").iterdir():
            os.link(file, root / "MNIST" / "raw" / file.name)
        roots[target] = root
    labels = roots["a file"] / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.unlink()
    shutil.copy(mnist_copy / "MNIST" / "raw" / labels.name, labels)  # its own inode, its own mode
    locked = [labels, roots["raw/"] / "MNIST" / "raw", roots["the root"]]
    for path in locked:
        path.chmod(0)
    try:
        results = run_worker([{"id": target, "argv": ["run", "data.dataset=mnist", "rounds=1", "--data-root", str(root),
                                                      "--out", str(tmp_path / "out" / root.name)]}
                              for target, root in roots.items()], prefix=denied())
    finally:
        for path in locked:
            path.chmod(0o755)
    assert [r["id"] for r in results] == list(roots)
    for result in results:
        outcome = verdict(result["code"], result["stderr"], result["escaped"])
        tally.record("unreadable data", result["id"], outcome)
        assert outcome == "clean error" and "permission denied" in result["stderr"], result


@pytest.mark.parametrize("command", [["list", "defenses"], ["inspect", "RUN"], ["sweep", "plan", "SWEEP"]])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, runs: Path, command: list[str], tally) -> None:
    """``fdcr-mpi inspect DIR | head`` ended in a BrokenPipeError traceback."""
    sweep = sweep_file(tmp_path / "s.yaml")
    argv = [str(runs / "s0") if word == "RUN" else str(sweep) if word == "SWEEP" else word for word in command]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: every write fails
    try:
        done = subprocess.run([str(FDCR), *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=env())
    finally:
        os.close(write_end)
    tally.record("closed pipe", command[0], "ok" if done.returncode == 141 and not done.stderr else "traceback")
    assert done.returncode == 141 and done.stderr == ""
