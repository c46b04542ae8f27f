"""The benchmark harness imports, extrapolates and reports correctly, and its quick mode runs.

Benchmarks measure; these tests never look at a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_benchmark_module_imports() -> None:
    import benchmarks.comm
    import benchmarks.local
    import benchmarks.mpi_comm
    import benchmarks.rank_entry
    import benchmarks.report
    import benchmarks.rounds
    import benchmarks.run
    import benchmarks.scale
    import benchmarks.speed  # noqa: F401


def test_the_matrix_says_where_fdcr_loses_by_v_for_backdoors_and_a_for_untargeted_attacks() -> None:
    from benchmarks.defense_matrix import where_fdcr_loses

    def cell(defense: str, attack: str, a: float, r: float) -> dict:
        return {"defense": defense, "attack": attack, "A": a, "R": r, "V": (a + r) / 2}

    cells = [cell("fdcr", "badnets", 70, 90), cell("fedavg", "badnets", 78, 40), cell("median", "badnets", 75, 97),
             cell("fdcr", "lie", 50, 99), cell("fedavg", "lie", 70, 99),
             cell("fdcr", "fisher_uniform", 70, 20),  # a forged Fisher: the other defenses keep their badnets cells
             {"defense": "krum", "attack": "badnets", "error": ["boom"]}]
    rows = {line.split(" | ")[0].strip("| "): line for line in where_fdcr_loses(cells).splitlines()[2:]}
    assert set(rows) == {"badnets", "lie", "fisher_uniform"}
    assert "| V | 80.0 | 59.0 | median 86.0 (of 3) | better |" in rows["badnets"]
    assert "| A | 50.0 | 70.0 | fedavg 70.0 (of 2) | worse |" in rows["lie"]  # judged by A, not by V
    assert "| V | 45.0 | 59.0 | median 86.0 (of 3) | worse |" in rows["fisher_uniform"]


def test_extrapolation_scales_training_by_epochs_and_data_and_the_fisher_by_data() -> None:
    from benchmarks.rounds import extrapolate

    phases = {"train": 2.0, "fisher": 1.0, "evaluate": 3.0, "round": 6.5}
    estimate, how = extrapolate(phases, epochs=1, data_scale=10.0)
    assert estimate["train"] == pytest.approx(200.0) and estimate["fisher"] == pytest.approx(10.0)
    assert estimate["evaluate"] == 3.0 and estimate["round"] == pytest.approx(213.5)
    assert how.startswith("EXTRAPOLATED")
    same, how = extrapolate(phases, epochs=10, data_scale=1.0)
    assert same == phases and "not extrapolated" in how


def test_targets_and_the_report_files(tmp_path: Path) -> None:
    from benchmarks.common import Figure
    from benchmarks.report import not_measured, write_results

    figures = [Figure("a", "ratio", 0.97, "x", ">=", 0.95), Figure("b", "fraction", 0.3, "x", "<=", 0.25),
               Figure("c", "no target", 1.0, "s"), *not_measured()]
    assert [f.passed for f in figures[:3]] == [True, False, None]
    meta = {"mode": "test", "started": "s", "finished": "f", "seconds": 1.0, "cpus": 2, "torch": "x",
            "load_start": [0, 0, 0], "load_end": [0, 0, 0], "notes": ["a note"]}
    json_path, md_path = write_results(tmp_path, meta, figures, {})
    assert len(json.loads(json_path.read_text())["figures"]) == len(figures)
    text = md_path.read_text()
    assert "FAIL" in text and "pass" in text and "not measured" in text


@pytest.mark.slow
@pytest.mark.mpi
def test_quick_mode_runs_and_writes_both_results_files(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "HYDRA_"))}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path),
               "--only", "local", "comm", "rounds"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    keys = {f["key"] for f in data["figures"]}
    assert {"train_throughput_ratio_t1", "fisher_fraction_layers_t1", "round_seconds_fdcr_one_t1",
            "batched_ratio_g5_t1", "batched_ratio_g5_rgb_t1", "speedup_fdcr_mpi3_t1"} <= keys
    values = {f["key"]: f["value"] for f in data["figures"]}
    # sections that catch their own failures still report a number when they ran
    assert values["comm_ratio_gather"] is not None and values["comm_ratio_bcast"] is not None
    assert values["speedup_fdcr_mpi3_t1"] is not None
    assert (tmp_path / "RESULTS.md").read_text().startswith("# fdcr_mpi benchmarks")


def test_the_inference_figures_time_both_poolings_and_render() -> None:
    """benchmarks.speed.inference on a few random images: the plain-kernel model really has the
    kernel (and computes the same predictions), and the section renders."""
    import torch

    from benchmarks.speed import inference, markdown, with_plain_pooling
    from fdcr_mpi.metrics import predictions
    from fdcr_mpi.models import build_model
    from fdcr_mpi.models.pooling import MaxPool2x2

    threads = torch.get_num_threads()
    try:
        figures = inference(None, images=32, repeats=1, top=3)
    finally:
        torch.set_num_threads(threads)
    assert set(figures["pool2x2"]) == set(figures["plain"]) == {"evaluate_s", "ddif_s"}
    assert figures["ddif_plain_over_pool2x2"] > 0 and len(figures["profile"]) == 3
    model, plain = build_model("simple_cnn", 0), build_model("simple_cnn", 0)
    with_plain_pooling(plain.module)
    assert type(plain.module.pool) is torch.nn.MaxPool2d and isinstance(model.module.pool, MaxPool2x2)
    x = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(predictions(model, x), predictions(plain, x))
    text = markdown({"epochs": 1, "runs": {}, "ratios": {}, "targets": {}, "profile": [], "inference": figures,
                     "steps": {"source": "s", "flops_per_sample": 1e6, "matmul_1thread": 1e9, "matmul_2threads": 1e9}})
    assert "DeepSight division differences, 10 clients, 32 random inputs" in text
