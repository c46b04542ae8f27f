"""The variants, the quarantine and the released Fisher on a CUDA device give the CPU's results
(the defenses take their device from the inputs; generators stay on the CPU). Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdcr_mpi.client import ClientData
from fdcr_mpi.client.fisher_released import released_fisher
from fdcr_mpi.data.datasets import SPECS
from fdcr_mpi.defenses import aggregate, create
from fdcr_mpi.defenses.base import RoundInputs
from fdcr_mpi.defenses.quarantine import defend_with_quarantine
from fdcr_mpi.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def fresh(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=300).astype(np.float32))


def round_inputs(t: int, w_t: torch.Tensor, device: torch.device, nan_row: int | None = None) -> RoundInputs:
    rng = np.random.default_rng(t)
    u = rng.normal(size=(10, 300)).astype(np.float32) * 0.1
    u[-3:] += 0.5
    w = torch.from_numpy(u) + w_t.cpu()
    if nan_row is not None:
        w[nan_row, ::3] = float("nan")
    fisher = torch.from_numpy(rng.gamma(0.3, size=(10, 300)).astype(np.float32))
    fisher[-3:] = torch.randn(3, 300, generator=torch.Generator().manual_seed(t))
    return RoundInputs(global_weights=w_t.to(device), client_weights=w.to(device), fisher=fisher.to(device),
                       sizes=torch.from_numpy(rng.integers(5, 50, 10).astype(np.float64)), lr=0.01, round=t,
                       total_rounds=5, seed=3, fresh_model=fresh)


CASES = [("multi_krum", {"variant": "marsfl"}), ("trimmed_median", {"variant": "marsfl"}),
         ("bulyan", {"variant": "marsfl"}), ("foolsgold", {}), ("foolsgold", {"variant": "marsfl"}),
         ("dnc", {"sub_dim": 100}), ("dnc", {"variant": "marsfl", "sub_dim": 100}), ("crfl", {}),
         ("crfl", {"variant": "marsfl"}), ("fdcr", {"variant": "released"}), ("fdcr", {})]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_rounds_on_cuda_with_a_quarantined_client_match_the_cpu(name: str, options: dict) -> None:
    on = {dev: create(name, **options) for dev in ("cpu", "cuda")}
    w = {dev: torch.zeros(300) for dev in on}
    for t in range(3):
        for dev, defense in on.items():
            result, quarantined = defend_with_quarantine(defense, round_inputs(t, w[dev], torch.device(dev),
                                                                               nan_row=2 if t else None))
            assert result.weights.device.type == dev and quarantined[2] == bool(t)
            w[dev] = result.weights
        torch.testing.assert_close(w["cuda"].cpu(), w["cpu"], rtol=1e-4, atol=1e-5)
    cpu_state, cuda_state = on["cpu"].state_dict(), on["cuda"].state_dict()
    assert set(cpu_state) == set(cuda_state)
    for key in cpu_state:  # checkpoints are numpy whatever the device
        assert isinstance(cuda_state[key], np.ndarray)
        np.testing.assert_allclose(cuda_state[key], cpu_state[key], rtol=1e-4, atol=1e-5)


def test_a_cuda_defense_resumes_from_a_cpu_checkpoint() -> None:
    cpu = create("bulyan", variant="marsfl")
    defend_with_quarantine(cpu, round_inputs(0, torch.zeros(300), torch.device("cpu")))
    gpu = create("bulyan", variant="marsfl")
    gpu.load_state_dict(cpu.state_dict())
    w = torch.ones(300)
    a = defend_with_quarantine(cpu, round_inputs(1, w, torch.device("cpu")))[0].weights
    b = defend_with_quarantine(gpu, round_inputs(1, w, CUDA))[0].weights
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_aggregate_api_keeps_cuda_tensors_on_cuda() -> None:
    w_t = torch.zeros(300, device=CUDA)
    w = torch.randn(10, 300, device=CUDA)
    res = aggregate("trimmed_median", w_t, w, variant="marsfl", fresh_model=fresh, seed=1)
    assert res.weights.device.type == "cuda"


def test_released_fisher_on_cuda_matches_the_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 1, 32, 32, generator=gen), torch.randint(0, 10, (80,), generator=gen)
    cpu_data = ClientData(x=x, y=y, poisoned=torch.zeros(80, dtype=torch.bool))
    gpu_data = cpu_data.to(CUDA)  # a client's data lives on its rank's device
    spec = SPECS["fmnist"]
    on_cpu = released_fisher(build_model("simple_cnn", 1), cpu_data, spec, torch.arange(80), 16,
                             torch.Generator().manual_seed(4))
    on_gpu = released_fisher(build_model("simple_cnn", 1, device=CUDA), gpu_data, spec,
                             torch.arange(80, device=CUDA), 16, torch.Generator().manual_seed(4))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-9)
