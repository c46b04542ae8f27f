"""Sweep files, runs by index, the local runner, the report's numbers and the figures."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from fdcr_mpi.analysis.report import build_report, csv_text, latex, markdown, write_report
from fdcr_mpi.cli import main
from fdcr_mpi.cli.sweep import sweep_run
from fdcr_mpi.config import config_hash, load_config, to_yaml
from fdcr_mpi.errors import UserError
from fdcr_mpi.store import RunFile, read_rounds, read_summary
from fdcr_mpi.sweep import (
    FINGERPRINT_ENV,
    ROOT_ENV,
    array_ranges,
    format_value,
    load_sweep,
    render_script,
    slurm_options,
    states,
    write_job,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "sweeps" / "small.yaml"
TINY = {"data.dataset": "digits", "rounds": 2, "train.local_epochs": 1, "fisher.max_samples": 32,
        "runtime.threads": 1}


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"name": "t", **fields}, sort_keys=False))
    return path


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_", "MPI_", "FDCR_SWEEP"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


# ----------------------------------------------------------------------------- expansion


def test_plan_crosses_the_axes_in_a_stable_order_minus_exclusions(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("data:\n  dataset: digits\n")
    path = write_sweep(tmp_path / "s.yaml", base="base.yaml", out="out", overrides={"train": {"local_epochs": 1}},
                       axes={"data.beta": [0.5, 0.3], "defense.name": ["fedavg", "fdcr"], "seed": [0, 1]},
                       exclude=[{"defense.name": "fedavg", "seed": 1}, {"data.beta": 0.3, "defense.name": "fdcr"}],
                       labels={"seed": "s"})
    sweep = load_sweep(path)
    names = [r.name for r in sweep.runs]
    assert names == ["beta0.5_fedavg_s0", "beta0.5_fdcr_s0", "beta0.5_fdcr_s1", "beta0.3_fedavg_s0"]
    assert [r.index for r in sweep.runs] == [0, 1, 2, 3]
    assert sweep.base == tmp_path / "base.yaml"
    assert sweep.runs[2].overrides == ("train.local_epochs=1", "data.beta=0.5", "defense.name=fdcr", "seed=1")
    assert sweep.runs[2].out == Path.cwd() / "out" / "beta0.5_fdcr_s1"
    assert load_sweep(path).fingerprint() == sweep.fingerprint()  # same file, same meaning of each index
    assert load_sweep(path, tmp_path / "elsewhere").runs[0].out == tmp_path / "elsewhere" / "beta0.5_fedavg_s0"
    config_path, overrides, out = sweep_run(path, 3)
    assert config_path == str(tmp_path / "base.yaml") and out == sweep.runs[3].out
    config = load_config(config_path, overrides)
    assert (config.data.dataset, config.data.beta, config.defense.name, config.seed) == ("digits", 0.3, "fedavg", 0)


def test_the_committed_sweep_files_expand_and_validate() -> None:
    table4 = load_sweep(REPO / "configs" / "sweeps" / "table4.yaml")
    assert list(table4.spec.axes)[:4] == ["data.dataset", "data.beta", "attack.malicious_ratio", "defense.name"]
    assert len(table4.runs) == 3 * 2 * 2 * 14 * len(table4.spec.axes["seed"])
    from fdcr_mpi.reference import paper_methods

    assert set(table4.spec.axes["defense.name"]) == set(paper_methods())
    assert len({r.name for r in table4.runs}) == len(table4.runs)
    for name in ("small.yaml", "fmnist_example.yaml"):
        sweep = load_sweep(REPO / "configs" / "sweeps" / name)
        assert len(states(sweep)) == len(sweep.runs)  # every run's config validates
    assert len(load_sweep(SMALL).runs) >= 6


@pytest.mark.parametrize("fields, message", [
    ({"axes": {"seed": [0]}, "bogus": 1}, "unknown sweep key 'bogus'"),
    ({"axes": {"seed": []}}, "axis 'seed'"),
    ({"axes": {"seed": [0, 0]}}, "lists a value twice"),
    ({"axes": {"seed": [0]}, "overrides": {"seed": 1}}, "both a fixed override and an axis"),
    ({"axes": {"seed": [0]}, "exclude": [{"rounds": 3}]}, "must name axes only"),
    ({"axes": {"seed": [0]}, "exclude": [{"seed": 0}]}, "excludes every run"),
    ({"axes": {"seed": [0]}, "base": "missing.yaml"}, "does not exist"),
    ({"axes": {"data.root": ["a/b", "a-b"]}}, "same name"),
    ({"axes": {"seed": [0]}, "slurm": {"ranks": 0}}, "slurm.ranks"),
])
def test_a_bad_sweep_file_is_one_sentence(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        load_sweep(write_sweep(tmp_path / "s.yaml", **fields))
    assert "\n" not in str(info.value)


def test_a_bad_config_value_names_the_run(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", axes={"defense.name": ["fdcr", "nope"]}))
    with pytest.raises(UserError, match=r"run 1 \(nope\).*'defense.name'"):
        states(sweep)


def test_an_index_out_of_range_names_the_valid_range(tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path / "s.yaml", axes={"seed": [0, 1, 2]})
    with pytest.raises(UserError, match="indices 0 to 2"):
        sweep_run(path, 3)
    assert main(["run", "--sweep", str(path), "--index", "-1"]) == 2
    assert "indices 0 to 2" in capsys.readouterr().err


def test_a_sweep_file_edited_since_the_job_was_written_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = write_sweep(tmp_path / "s.yaml", axes={"seed": [0, 1]})
    monkeypatch.setenv(FINGERPRINT_ENV, load_sweep(path).fingerprint())
    sweep_run(path, 1)
    write_sweep(path, axes={"seed": [1, 0]})
    with pytest.raises(UserError, match="changed since this job was written"):
        sweep_run(path, 1)
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "root"))
    monkeypatch.delenv(FINGERPRINT_ENV)
    assert sweep_run(path, 0)[2] == tmp_path / "root" / "seed1"


@pytest.mark.parametrize("value", ["fdcr", "0.5", "iid", "null", "true", "a b", "x,y", "it's", "a\\\\b", 0.5, 3, True, None,
                                   1e-5, "1e-5", ""])
def test_override_values_parse_back_to_themselves(value) -> None:
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"k={format_value(value)}"]))["k"]
    assert parsed == value and type(parsed) is type(value)


def test_array_ranges() -> None:
    assert array_ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert array_ranges([3]) == "3"


# ----------------------------------------------------------------------------- run files by hand


def fake_run(out: Path, overrides: list[str], *, a: list[float], r: list[float], status: str = "complete",
             per_client: bool = False, seed_malicious: int = 3) -> Path:
    """A run file written through the store, with chosen A and R per round (V = (A + R) / 2) and the
    ASR over every triggered image 10 points above the ASR of the other classes (the columns a run
    file held before R_paper was stored: the report derives R_paper = R - 10 from them)."""
    config = load_config(None, overrides, warn_unused=False)  # like a sweep's runs
    k = config.data.num_clients
    malicious = np.zeros(k, bool)
    malicious[-seed_malicious:] = True
    run = RunFile.create(out / "run.h5", config_yaml=to_yaml(config), config_hash=config_hash(config),
                         version="test", num_clients=k, sizes=np.full(k, 10), malicious=malicious,
                         partition=[np.arange(10 * i, 10 * i + 10) for i in range(k)], num_params=1)
    rng = np.random.default_rng(len(a))
    for t, (ai, ri) in enumerate(zip(a, r)):
        row = {"round": t, "A": ai, "R": ri, "V": (ai + ri) / 2, "asr": 100 - ri, "asr_incl_target": 110 - ri,
               "removed": malicious & (t % 2 == 0), "alpha_hat": np.where(malicious, 0.0, 1 / (~malicious).sum())}
        if per_client:
            row["discrepancy"] = rng.uniform(1e-5, 1e-4, k) * np.where(malicious, 3, 1)
        run.append_round(row)
    run.set_status(status)
    run.close()
    return out


REFERENCE = """method,dataset,beta,malicious_ratio,A,R,V
Vanilla,fmnist,0.5,0.3,87.15,0.26,43.70
FDCR,fmnist,0.5,0.3,86.81,61.92,74.36
FDCR,fmnist,0.3,0.3,85.59,89.62,87.60
"""


@pytest.fixture
def fake_sweep(tmp_path: Path) -> tuple[Path, dict]:
    """Runs on fmnist (beta 0.5 and 0.3, two seeds) and one unfinished run; A/R per round known."""
    root = tmp_path / "root"
    series = {}
    rng = np.random.default_rng(0)
    for method in ("fedavg", "fdcr"):
        for beta in (0.5, 0.3):
            for seed in (0, 1, 2):
                a, r = rng.uniform(50, 90, 7).round(2).tolist(), rng.uniform(0, 100, 7).round(2).tolist()
                name = f"{method}_b{beta}_s{seed}"
                fake_run(root / name, ["data.dataset=fmnist", f"data.beta={beta}", f"defense.name={method}",
                                       f"seed={seed}", "rounds=7"], a=a, r=r, per_client=method == "fdcr")
                series[name] = (a, r)
    fake_run(root / "unfinished", ["data.dataset=fmnist", "defense.name=fedavg", "seed=9", "rounds=7"],
             a=[1.0], r=[2.0], status="preempted")
    (tmp_path / "table4.csv").write_text(REFERENCE)
    return root, series


def by_hand(series: dict, method: str, beta: float) -> dict[str, tuple[float, float]]:
    """Mean and sample std over seeds of the mean of the last 5 rounds (R_paper = R - 10: fake_run)."""
    finals = {"A": [], "R": [], "V": [], "R_paper": [], "V_paper": []}
    for seed in (0, 1, 2):
        a, r = (np.array(x) for x in series[f"{method}_b{beta}_s{seed}"])
        finals["A"].append(a[-5:].mean())
        finals["R"].append(r[-5:].mean())
        finals["V"].append(((a + r) / 2)[-5:].mean())
        finals["R_paper"].append((r - 10)[-5:].mean())
        finals["V_paper"].append(((a + r - 10) / 2)[-5:].mean())
    return {m: (float(np.mean(v)), float(np.std(v, ddof=1))) for m, v in finals.items()}


def test_report_numbers_match_the_run_files_by_hand(fake_sweep, tmp_path: Path) -> None:
    root, series = fake_sweep
    report = build_report([root], reference=tmp_path / "table4.csv")
    rows = list(csv.DictReader(io.StringIO(csv_text(report))))
    assert len(rows) == 4 and len(report.left_out) == 1
    for row in rows:
        expected = by_hand(series, row["method"], float(row["data.beta"]))
        assert row["n_seeds"] == "3" and row["seeds"] == "0 1 2"
        for m, (mean, std) in expected.items():
            assert float(row[f"{m}_mean"]) == pytest.approx(mean, abs=1e-4)
            assert float(row[f"{m}_std"]) == pytest.approx(std, abs=1e-4)
    paper = {(r["method"], r["data.beta"]): (r["paper_A"], r["paper_R"], r["paper_V"]) for r in rows}
    assert paper[("fedavg", "0.5")] == ("87.1500", "0.2600", "43.7000")
    assert paper[("fdcr", "0.3")] == ("85.5900", "89.6200", "87.6000")
    assert paper[("fedavg", "0.3")] == ("", "", "")  # the paper has no such row in this reference


def test_report_writes_markdown_csv_and_latex_with_the_paper_beside_ours(fake_sweep, tmp_path: Path) -> None:
    root, series = fake_sweep
    paths = write_report([root], tmp_path / "report", reference=tmp_path / "table4.csv")
    assert [p.name for p in paths] == ["table4.md", "table4.csv", "table4.tex"]
    md = paths[0].read_text()
    mean, std = by_hand(series, "fdcr", 0.5)["A"]
    assert f"{mean:.2f} ± {std:.2f}" in md
    # the paper's figures sit under A, R_paper and V_paper (its metric), not under our R and V
    assert "| *Vanilla (paper)* | *87.15* | *0.26* | *43.70* |  |  |" in md
    assert "Fashion-MNIST, β=0.5 A | Fashion-MNIST, β=0.5 R_paper | Fashion-MNIST, β=0.5 V_paper | " in md
    assert "## attacker ratio 0.3" in md and "**R_paper** = 100 − ASR over every triggered test image" in md
    assert md.index("β=0.5") < md.index("β=0.3")  # the paper's column order
    assert md.index("| Vanilla |") < md.index("| FDCR |")  # and row order
    assert "Not counted: 1 unfinished runs" in md and "preempted" in md
    tex = paths[2].read_text()
    assert "\\begin{tabular}" in tex and "\\textit{86.81}" in tex and f"{mean:.2f} $\\pm$ {std:.2f}" in tex
    assert tex.count("\\begin{table}") == 1 and "\\multicolumn{5}{c}{Fashion-MNIST, $\\beta$=0.5}" in tex
    assert "\\textit{85.59} & \\textit{89.62} & \\textit{87.60} &  &  \\\\" in tex
    partial = build_report([root], reference=tmp_path / "table4.csv", partial=True)
    assert len(partial.counted) == 13 and "Not counted" not in markdown(partial)
    assert "\\textit" not in latex(build_report([root / "fedavg_b0.3_s0"], reference=tmp_path / "table4.csv"))


def test_report_finds_the_papers_table_shipped_with_the_package(fake_sweep, monkeypatch) -> None:
    """In any clone: no ../shared, no --reference; the paper's Table 4 comes from the package."""
    monkeypatch.delenv("FDCR_REFERENCE", raising=False)
    monkeypatch.chdir("/")
    root, _ = fake_sweep
    report = build_report([root])
    rows = {(r["method"], r["data.beta"]): r for r in csv.DictReader(io.StringIO(csv_text(report)))}
    assert (rows[("fdcr", "0.5")]["paper_A"], rows[("fdcr", "0.5")]["paper_R"]) == ("86.9200", "88.3200")
    assert rows[("fedavg", "0.3")]["paper_V"] == "44.6200"
    assert "shipped with fdcr_mpi" in markdown(report) and "No reference" not in markdown(report)


def test_report_of_a_folder_without_runs_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no run files"):
        build_report([tmp_path])
    assert main(["report", str(tmp_path / "missing")]) == 2


def is_real_png(path: Path) -> bool:
    from matplotlib.image import imread

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n" or path.stat().st_size < 20_000:
        return False
    pixels = imread(path)
    return pixels.shape[0] > 300 and pixels.shape[1] > 600 and float(pixels[..., :3].std()) > 0.05


def test_plot_draws_figure3_per_setting_and_figure2_per_fdcr_setting(fake_sweep, tmp_path: Path, capsys) -> None:
    root, _ = fake_sweep
    assert main(["plot", str(root), "--out", str(tmp_path / "fig")]) == 0
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == ["fig2_fdcr_fmnist_beta0.3_ratio0.3_seed0.png", "fig2_fdcr_fmnist_beta0.5_ratio0.3_seed0.png",
                     "fig3_fmnist_beta0.3_ratio0.3.png", "fig3_fmnist_beta0.5_ratio0.3.png"]
    assert all(is_real_png(tmp_path / "fig" / n) for n in names)
    assert capsys.readouterr().out.count(".png") == 4


# ----------------------------------------------------------------------------- SLURM script (no SLURM needed)


def test_the_job_lists_only_the_runs_still_to_do(tmp_path: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "root"), overrides=TINY,
                       axes={"defense.name": ["fedavg", "fdcr"], "seed": [0, 1, 2]},
                       slurm={"ranks": 3, "throttle": 2, "time": "00:20:00"})
    sweep = load_sweep(path)
    for index in (0, 3):  # complete runs are skipped; an unfinished one (4) is listed to resume
        run = sweep.runs[index]
        fake_run(run.out, list(run.overrides), a=[1, 2], r=[3, 4])
    fake_run(sweep.runs[4].out, list(sweep.runs[4].overrides), a=[1], r=[3], status="preempted")
    options = slurm_options(sweep, gpus=2, partition="gpu")
    script, runs, message = write_job(sweep, options, data_root=str(tmp_path))
    assert [r.index for r in runs] == [1, 2, 4, 5] and "2 complete, 4 to run" in message
    text = script.read_text()
    for line in ("#SBATCH --array=1-2,4-5%2", "#SBATCH --ntasks=3", "#SBATCH --requeue", "#SBATCH --time=00:20:00",
                 "#SBATCH --signal=USR1@120", "#SBATCH --gres=gpu:2", "#SBATCH --partition=gpu",
                 f"#SBATCH --chdir={Path.cwd()}", "srun --mpi=pmi2", f"--sweep {path}", '--index "${SLURM_ARRAY_TASK_ID}"',
                 f"--data-root {tmp_path}", "scontrol requeue", f"{FINGERPRINT_ENV}={sweep.fingerprint()}"):
        assert line in text, line
    assert "${" not in text.replace("${SLURM", "").replace("${name}", "")  # every placeholder filled
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    for run in (sweep.runs[i] for i in (1, 2, 4, 5)):
        fake_run(run.out, list(run.overrides), a=[1, 2], r=[3, 4], status="complete") if run.index != 4 else None
    (sweep.runs[4].out / "run.h5").unlink()
    fake_run(sweep.runs[4].out, list(sweep.runs[4].overrides), a=[1, 2], r=[3, 4])
    assert write_job(sweep, options)[0] is None


def script_lines(text: str) -> str:
    """A job script without its comments (``#SBATCH`` lines are kept: they are directives)."""
    return "\n".join(line for line in text.splitlines()
                     if line.startswith("#SBATCH") or not line.lstrip().startswith("#"))


def test_a_gpu_sweep_spreads_each_run_over_its_nodes(tmp_path: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "root"), overrides=TINY, axes={"seed": [0, 1]})
    sweep = load_sweep(path)
    script, _, _ = write_job(sweep, slurm_options(sweep, nodes=2, gpus=4, ranks=9, cpus_per_task=4))
    text = script_lines(script.read_text())
    for line in ("#SBATCH --ntasks=9", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=5", "#SBATCH --gres=gpu:4",
                 "#SBATCH --cpus-per-task=4", 'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"',
                 "srun --mpi=pmi2 --distribution=cyclic "):
        assert line in text, line
    assert "--nodes=1" not in text and "runtime.threads" not in text  # threads follow each rank's binding
    one_node = script_lines(write_job(sweep, slurm_options(sweep, gpus=1))[0].read_text())
    assert "#SBATCH --nodes=1" in one_node and "--distribution" not in one_node and "ntasks-per-node" not in one_node
    with pytest.raises(UserError, match="3 nodes need at least 3 ranks"):
        slurm_options(sweep, nodes=3, ranks=2)


def test_a_run_dir_of_another_config_stops_the_submission(tmp_path: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", out=str(tmp_path / "root"), overrides=TINY, axes={"seed": [0, 1]})
    sweep = load_sweep(path)
    fake_run(sweep.runs[0].out, [*sweep.runs[0].overrides, "rounds=3"], a=[1], r=[1])
    assert states(sweep)[0] == "other-config"
    with pytest.raises(UserError, match="another config"):
        write_job(sweep, slurm_options(sweep))


def test_sweep_slurm_cli_writes_a_script_without_submitting(tmp_path: Path, capsys) -> None:
    assert main(["sweep", "slurm", str(SMALL), "--out-root", str(tmp_path), "--ranks", "2", "--time", "00:05:00"]) == 0
    out = capsys.readouterr().out
    script = tmp_path / "slurm" / "small.sbatch"
    assert f"wrote {script}" in out and f"sbatch {script}" in out
    text = render_script(load_sweep(SMALL, tmp_path), [0, 1], slurm_options(load_sweep(SMALL)))
    assert "#SBATCH --array=0-1%4" in text and "#SBATCH --ntasks=3" in text
    assert "#SBATCH --ntasks=2" in script.read_text() and "#SBATCH --time=00:05:00" in script.read_text()


# ----------------------------------------------------------------------------- real runs (digits)


@pytest.mark.slow
def test_run_by_sweep_index_then_plan_shows_it_complete(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fdcr_mpi", "run", "--sweep", str(SMALL), "--index", "2", "--quiet"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "sweeps" / "small" / "fdcr_s0"
    summary = read_summary(out / "run.h5")
    assert summary["status"] == "complete" and summary["rounds_done"] == load_sweep(SMALL).spec.overrides["rounds"]
    config = yaml.safe_load(summary["config"])
    assert config["defense"]["name"] == "fdcr" and config["seed"] == 0 and config["data"]["dataset"] == "digits"
    plan = subprocess.run([sys.executable, "-m", "fdcr_mpi", "sweep", "plan", str(SMALL)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert plan.returncode == 0
    lines = {line.split()[2]: line.split()[1] for line in plan.stdout.splitlines()[1:-1]}
    assert lines["fdcr_s0"] == "complete" and lines["fedavg_s0"] == "todo"
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=clean_env())
    assert again.returncode == 0 and "already complete" in again.stdout
    other = subprocess.run([*command[:-1], "rounds=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=clean_env())
    assert other.returncode == 2 and "another config" in other.stderr  # the directory is taken


@pytest.mark.slow
def test_local_runner_runs_every_run_skips_complete_ones_and_reports_failures(tmp_path: Path) -> None:
    good = write_sweep(tmp_path / "good.yaml", out=str(tmp_path / "good"), overrides=TINY,
                       axes={"defense.name": ["fedavg", "fdcr"], "seed": [0, 1]}, labels={"seed": "s"})
    command = [sys.executable, "-m", "fdcr_mpi", "sweep", "local", str(good), "-j", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 to run, 2 at a time" in result.stderr and "all 4 runs finished" in result.stderr
    assert "4/4" in result.stderr  # the progress bar: runs done of runs
    sweep = load_sweep(good)
    assert states(sweep) == ["complete"] * 4
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean_env())
    assert again.returncode == 0 and "4 already complete, 0 to run" in again.stderr

    # the report of real run files, against the numbers computed here from the same files
    report = build_report([tmp_path / "good"])
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(csv_text(report)))}
    for method in ("fedavg", "fdcr"):
        finals = [read_rounds(tmp_path / "good" / f"{method}_s{s}" / "run.h5")["V"][-5:].mean() for s in (0, 1)]
        assert float(rows[method]["V_mean"]) == pytest.approx(np.mean(finals), abs=1e-4)
        assert float(rows[method]["V_std"]) == pytest.approx(np.std(finals, ddof=1), abs=1e-4)

    bad = write_sweep(tmp_path / "bad.yaml", out=str(tmp_path / "bad"),
                      overrides={**{k: v for k, v in TINY.items() if k != "data.dataset"},
                                 "data.root": str(tmp_path / "no-data")},
                      axes={"data.dataset": ["digits", "mnist"]})
    failed = subprocess.run([sys.executable, "-m", "fdcr_mpi", "sweep", "local", str(bad), "-j", "2"],
                            capture_output=True, text=True, timeout=300, env=clean_env())
    assert failed.returncode == 1, failed.stderr
    assert "1 of 2 runs failed" in failed.stderr and "[1] mnist: exit code 2" in failed.stderr
    assert "mnist.log" in failed.stderr and (tmp_path / "bad" / "logs" / "mnist.log").stat().st_size > 0


def test_options_of_other_defenses_do_not_split_the_table(tmp_path: Path) -> None:
    """A run file written when another defense had other defaults still lands in the same cell."""
    base = ["data.dataset=fmnist", "defense.name=fedavg", "rounds=5"]
    fake_run(tmp_path / "s0", [*base, "seed=0"], a=[1, 2, 3, 4, 5], r=[5, 4, 3, 2, 1])
    fake_run(tmp_path / "s1", [*base, "seed=1", "crfl.clip_bound=3.0"], a=[1, 2, 3, 4, 5], r=[5, 4, 3, 2, 1])
    report = build_report([tmp_path], reference=None)
    assert [c.n for c in report.layout.cells.values()] == [2]
    assert "crfl" not in markdown(report)
