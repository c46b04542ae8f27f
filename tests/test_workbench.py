"""The researcher's workbench: load_run / load_sweep (pandas), compare, config, typo hints, the
console's and inspect's figures, the resume command as it can be typed."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

import fdcr_mpi
from fdcr_mpi.cli import main
from fdcr_mpi.config import config_hash, load_config, to_yaml
from fdcr_mpi.errors import UserError
from fdcr_mpi.program import program, resume_command
from fdcr_mpi.store import RunFile, format_summary, read_summary
from tests.test_sweep import fake_run

TINY = ["data.dataset=digits", "train.local_epochs=1", "fisher.max_samples=16"]


def written_run(out: Path, overrides: list[str], a: list[float], tpr: list[float], fpr: list[float]) -> Path:
    """A run file with chosen A, detection rates and round times (R = 50, R_paper = 40)."""
    config = load_config(None, overrides)
    k = config.data.num_clients
    malicious = np.arange(k) >= k - 3
    run = RunFile.create(out / "run.h5", config_yaml=to_yaml(config), config_hash=config_hash(config),
                         version="test", num_clients=k, sizes=np.full(k, 10), malicious=malicious,
                         partition=[np.arange(10 * i, 10 * i + 10) for i in range(k)], num_params=1)
    for t, (ai, ti, fi) in enumerate(zip(a, tpr, fpr)):
        run.append_round({"round": t, "A": ai, "R": 50.0, "V": (ai + 50) / 2, "asr": 50.0, "asr_incl_target": 60.0,
                          "tpr": ti, "fpr": fi, "seconds_round": 30.0, "removed": malicious & (t % 2 == 0)})
    run.set_status("complete" if len(a) >= config.rounds else "running")
    run.close()
    return out


# ----------------------------------------------------------------------------- config


def test_a_misspelt_key_gets_the_closest_known_one() -> None:
    with pytest.raises(UserError, match=r"unknown config key 'defense\.nme'; did you mean 'defense\.name'\?"):
        load_config(None, ["defense.nme=krum"])
    with pytest.raises(UserError, match=r"'multi_krum\.varinat'; did you mean 'multi_krum\.variant'\?"):
        load_config(None, ["multi_krum.varinat=marsfl"])
    with pytest.raises(UserError, match=r"unknown config key 'qqq'$"):  # nothing close: no guess
        load_config(None, ["qqq=1"])
    from fdcr_mpi.defenses import create

    with pytest.raises(UserError, match=r"'multi_krum\.mm'; did you mean 'multi_krum\.m'\?"):
        create("multi_krum", mm=3)


def test_options_of_a_defense_not_in_use_are_reported_as_ignored() -> None:
    with pytest.warns(UserWarning, match=r"multi_krum\.variant set, but the defense is fedavg: ignored"):
        config = load_config(None, ["defense.name=fedavg", "multi_krum.variant=marsfl"])
    assert config_hash(config) == config_hash(load_config(None, ["defense.name=fedavg"]))  # and truly ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["defense.name=multi_krum", "multi_krum.variant=marsfl"])  # in use: no warning


def test_config_prints_the_resolved_config_its_hash_and_a_defenses_options(capsys) -> None:
    assert main(["config", "configs/quickstart.yaml", "seed=3", "data.beta=0.3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["data"]["beta"] == 0.3 and printed["data"]["dataset"] == "digits"
    assert printed["defense"]["name"] == "fdcr" and printed["train"]["batch_size"] == 32  # from the file
    assert main(["config", "configs/quickstart.yaml", "--hash"]) == 0
    assert capsys.readouterr().out.strip() == config_hash(load_config("configs/quickstart.yaml"))
    assert main(["config", "--options", "multi_krum"]) == 0
    options = capsys.readouterr().out
    assert "multi_krum.variant: 'original'" in options and "multi_krum.f: None" in options
    assert main(["config", "--options", "nope"]) == 2
    assert "no defense 'nope'; choose one of:" in capsys.readouterr().err


def test_the_help_names_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("run", "resume", "inspect", "list", "compare", "config", "sweep", "report", "plot"):
        assert f"    {command} " in text, command


# ----------------------------------------------------------------------------- pandas


def test_load_run_has_a_row_per_round_from_1_and_a_column_per_client(tmp_path: Path) -> None:
    out = written_run(tmp_path / "r", [*TINY, "rounds=4"], a=[10, 20, 30, 40], tpr=[1, 0, 1, 0], fpr=[0, 0.5, 0, 0])
    frame = fdcr_mpi.load_run(out)
    assert list(frame.index) == [1, 2, 3, 4] and frame.index.name == "round"
    assert frame["A"].tolist() == [10, 20, 30, 40] and frame["tpr"].tolist() == [1, 0, 1, 0]
    assert [c for c in frame.columns if c.startswith("removed[")] == [f"removed[{k}]" for k in range(10)]
    assert frame["removed[9]"].tolist() == [True, False, True, False] and not frame["removed[0]"].any()
    assert frame["R_paper"].tolist() == [40.0] * 4  # derived from asr_incl_target
    assert frame.attrs["attackers"] == [7, 8, 9] and frame.attrs["config"]["rounds"] == 4


def test_load_sweep_has_a_row_per_run_with_its_axes_and_final_figures(tmp_path: Path) -> None:
    for seed in (0, 1):
        for defense in ("fedavg", "fdcr"):
            fake_run(tmp_path / f"{defense}_s{seed}", [*TINY, "rounds=6", f"defense.name={defense}", f"seed={seed}"],
                     a=[10 * (seed + 1)] * 6, r=[60 if defense == "fdcr" else 5] * 6)
    fake_run(tmp_path / "half", [*TINY, "rounds=6", "defense.name=fdcr", "seed=2"], a=[50, 50], r=[70, 70],
             status="running")
    frame = fdcr_mpi.load_sweep(tmp_path).set_index("run")
    assert frame.attrs["axes"] == ["defense.name", "seed"]
    assert set(frame.index) == {"fedavg_s0", "fedavg_s1", "fdcr_s0", "fdcr_s1", "half"}
    assert frame.loc["fdcr_s1", "A"] == 20 and frame.loc["fdcr_s1", "R"] == 60 and frame.loc["fdcr_s1", "R_paper"] == 50
    assert frame.loc["fedavg_s0", "seed"] == 0 and frame.loc["fedavg_s0", "defense.name"] == "fedavg"
    assert frame.loc["half", "status"] == "running" and frame.loc["half", "rounds_done"] == 2
    complete = frame[frame["status"] == "complete"]
    assert complete.groupby("defense.name")["R"].mean().to_dict() == {"fdcr": 60, "fedavg": 5}


# ----------------------------------------------------------------------------- compare, inspect


def test_compare_puts_runs_side_by_side_and_plots_their_rounds(tmp_path: Path, capsys) -> None:
    written_run(tmp_path / "a", [*TINY, "rounds=6", "defense.name=fedavg"], a=[10, 20, 30, 40, 50, 60],
                tpr=[0] * 6, fpr=[0] * 6)
    written_run(tmp_path / "b", [*TINY, "rounds=6"], a=[60] * 6, tpr=[1, 1, 0, 1, 1, 0], fpr=[0.5, 0, 0, 0, 0, 0])
    figure = tmp_path / "figs" / "ab.png"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(figure)]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
             if line.strip() and not line.startswith("figure:")}
    assert lines["defense.name"] == ["fedavg", "fdcr"]
    assert lines["A"] == ["40.00", "60.00"]  # the mean of the last 5 rounds: (20+...+60)/5
    assert lines["TPR"] == ["0.00", "0.67"] and lines["FPR"] == ["0.00", "0.08"]  # means over the 6 rounds
    assert lines["rounds"] == ["6/6", "6/6"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", str(tmp_path / "a"), "--plot", str(tmp_path / "a" / "run.h5" / "x.png")]) == 2
    assert "cannot write the figure" in capsys.readouterr().err


def test_inspect_shows_the_setting_the_attackers_the_time_and_the_definitions(tmp_path: Path) -> None:
    out = written_run(tmp_path / "r", [*TINY, "rounds=3", "attack.fisher=noise"], a=[10, 20, 30],
                      tpr=[1, 1, 1], fpr=[0, 0, 0])
    text = format_summary(read_summary(out / "run.h5"))
    assert "digits, simple_cnn, 10 clients, beta 0.5; badnets, 30% attackers (Fisher: noise); defense fdcr; seed 0" in text
    assert "3 malicious: [7, 8, 9]" in text and "3 of 3" in text and "1.5 min in all" in text
    assert "final (last 3)  A 20" in text  # a 3-round run: its 3 rounds, not "last 5"
    assert "R_paper: every triggered image" in text and "A: main-task accuracy" in text


def test_the_console_names_its_windows_as_inspect_does(tmp_path: Path, capsys) -> None:
    assert main(["run", *TINY, "rounds=2", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    final = next(line for line in out.splitlines() if line.startswith("final (mean"))
    assert final.startswith("final (mean of the last 2 rounds): A ") and "detection (mean over rounds): TPR " in final
    summary = read_summary(tmp_path / "r" / "run.h5")
    assert f"TPR {summary['tpr_mean']:.2f}  FPR {summary['fpr_mean']:.2f}" in final
    assert f"A {summary['final_A']:.2f}" in final


def test_the_resume_command_is_printed_as_it_can_be_typed(tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "venv" / "bin" / "fdcr-mpi"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "run"])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert resume_command("runs/x") == f"{script} resume runs/x"  # not on PATH: the path it was started by
    monkeypatch.setenv("PATH", str(script.parent))
    assert program() == "fdcr-mpi"  # on PATH and the same file: its name
    monkeypatch.setattr(sys, "argv", ["/somewhere/fdcr_mpi/__main__.py"])
    assert program() == f"{sys.executable} -m fdcr_mpi"


def test_report_counts_a_repeated_seed_once(tmp_path: Path) -> None:
    from fdcr_mpi.analysis.report import build_layout, load_records
    from fdcr_mpi.store import RunFileWarning

    for name, seed, a in (("s0", 0, 10), ("s0_copy", 0, 10), ("s1", 1, 30)):
        fake_run(tmp_path / name, [*TINY, "rounds=2", f"seed={seed}"], a=[a, a], r=[5, 5])
    records, _ = load_records([tmp_path])
    with pytest.warns(RunFileWarning, match="the same setting and seed as"):
        layout = build_layout(records)
    (cell,) = layout.cells.values()
    assert cell.n == 2 and cell.seeds == [0, 1] and cell.mean("A") == 20


def test_the_backfed_preset_holds_the_setting_its_header_cites() -> None:
    config = load_config("configs/presets/backfed_cifar10.yaml")
    assert (config.data.dataset, config.data.num_clients, config.clients_per_round, config.data.beta) == \
        ("cifar10", 100, 10, 0.5)
    assert (config.model.name, config.train.local_epochs, config.train.batch_size) == ("resnet18", 2, 64)
    assert (config.train.lr, config.train.momentum, config.train.weight_decay) == (0.1, 0.9, 5e-4)
    assert (config.attack.malicious_ratio, config.attack.malicious_ids, config.attack.target_label,
            config.attack.poison_rate) == (0.1, "random", 2, 20 / 64)


def test_the_console_is_plain_lines_in_a_batch_log(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "fdcr_mpi", "run", *TINY, "rounds=2", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any(c in done.stdout + done.stderr for c in "\r\b\x1b")  # no cursor movement or colour in a log
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert [line.split()[1] for line in rounds] == ["1/2", "2/2"] and all("ETA " in line for line in rounds)


def test_a_run_directory_of_another_config_is_refused_naming_the_keys_that_differ(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, "rounds=1", "train.batch_clients=1", "--quiet", "--out", str(out)]) == 0
    before = (out / "run.h5").read_bytes()
    capsys.readouterr()
    assert main(["run", *TINY, "rounds=1", "--quiet", "--out", str(out)]) == 2  # the default is now 5 a group
    err = capsys.readouterr().err
    assert "belongs to another config" in err and "differs from this command in train.batch_clients (1 there, 5 here)" in err
    assert len(err.strip().splitlines()) == 1 and (out / "run.h5").read_bytes() == before
