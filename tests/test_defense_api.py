"""The defense registry, auto-registration, FedAvg and the ``aggregate`` entry point."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

import fdcr_mpi.defenses as defenses
from fdcr_mpi.defenses import AggregateResult, aggregate, available, create, import_submodules
from fdcr_mpi.defenses import base as base_module
from fdcr_mpi.errors import UserError


def test_builtin_defenses_registered():
    names = available()
    assert "fedavg" in names and "fdcr" in names
    assert names["fdcr"].needs_fisher and not names["fedavg"].needs_fisher


def test_dropped_in_module_registers_itself(tmp_path, monkeypatch):
    """A file in a defense package registers on import, with no edit of __init__."""
    monkeypatch.setattr(base_module.REGISTRY, "classes", dict(base_module.REGISTRY.classes))
    pkg = tmp_path / "extra_defs_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_private.py").write_text("raise RuntimeError('private modules are skipped')\n")
    (pkg / "halfavg.py").write_text(textwrap.dedent("""
        from fdcr_mpi.defenses.base import Defense, RoundResult, register
        import numpy as np

        @register("test_halfavg")
        class HalfAvg(Defense):
            def aggregate(self, inputs):
                k = inputs.num_clients
                return RoundResult(inputs.client_weights.mean(0) * 0.5, np.full(k, 1 / k),
                                   np.zeros(k, bool))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_submodules("extra_defs_pkg") == ["halfavg"]
        assert "test_halfavg" in available()
        res = aggregate("test_halfavg", np.zeros(2), np.ones((3, 2)))
        np.testing.assert_allclose(res.weights, [0.5, 0.5])
    finally:
        for mod in [m for m in sys.modules if m.startswith("extra_defs_pkg")]:
            del sys.modules[mod]
    # the real package imported every one of its modules
    assert "fdcr_mpi.defenses.fedavg" in sys.modules and "fdcr_mpi.defenses.fdcr" in sys.modules


def test_fedavg_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    w_t = rng.normal(size=7).astype(np.float32)
    w = rng.normal(size=(4, 7)).astype(np.float32)
    sizes = np.array([10.0, 30.0, 20.0, 40.0])
    res = aggregate("fedavg", w_t, w, sizes=sizes)
    expected = (sizes[:, None] * w.astype(np.float64)).sum(0) / sizes.sum()
    np.testing.assert_allclose(res.weights, expected, atol=1e-6)
    np.testing.assert_allclose(res.alpha_hat, sizes / sizes.sum())
    assert not res.removed.any() and res.removed.dtype == bool
    equal = aggregate("fedavg", w_t, w)  # sizes None -> equal weights
    np.testing.assert_allclose(equal.weights, w.astype(np.float64).mean(0), atol=1e-6)
    np.testing.assert_allclose(equal.alpha_hat, np.full(4, 0.25))


def test_aggregate_numpy_in_numpy_out_torch_in_torch_out():
    rng = np.random.default_rng(1)
    w_t = rng.normal(size=5)
    w = rng.normal(size=(3, 5))
    out_np = aggregate("fedavg", w_t, w)
    assert isinstance(out_np, AggregateResult)
    assert isinstance(out_np.weights, np.ndarray) and out_np.weights.dtype == np.float32
    out_t = aggregate("fedavg", torch.tensor(w_t, dtype=torch.float32), torch.tensor(w, dtype=torch.float32))
    assert isinstance(out_t.weights, torch.Tensor) and out_t.weights.dtype == torch.float32
    np.testing.assert_array_equal(out_np.weights, out_t.weights.numpy())
    assert isinstance(out_t.alpha_hat, np.ndarray) and out_t.alpha_hat.dtype == np.float64


def test_aggregate_does_not_modify_inputs():
    rng = np.random.default_rng(2)
    w_t = rng.normal(size=6).astype(np.float32)
    w = (w_t + 0.01 * rng.normal(size=(4, 6))).astype(np.float32)
    f = np.abs(rng.normal(size=(4, 6))).astype(np.float32)
    copies = (w_t.copy(), w.copy(), f.copy())
    aggregate("fdcr", w_t, w, f)
    for a, b in zip((w_t, w, f), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"client_weights": np.zeros((3, 5))}, r"client_weights must be \(K, D\) = \(K, 4\)"),
        ({"client_weights": np.zeros(4)}, "client_weights must be"),
        ({"global_weights": np.zeros((1, 4))}, "global_weights must be a vector"),
        ({"fisher": np.zeros((3, 5))}, "fisher must have the shape"),
        ({"sizes": np.ones(2)}, "sizes must be a vector of the K = 3"),
        ({"sizes": np.zeros(3)}, "not all zero"),
        ({"sizes": np.array([1.0, -1.0, 2.0])}, "non-negative"),
        ({"trainable": np.ones(5, dtype=bool)}, r"trainable must be a \(D,\) = \(4,\) mask"),
        ({"lr": 0.0}, "lr must be a positive number"),
    ],
)
def test_aggregate_shape_errors(kwargs, match):
    args = {"global_weights": np.zeros(4), "client_weights": np.zeros((3, 4)), "fisher": np.ones((3, 4))}
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        aggregate("fdcr", **args)


def test_aggregate_unknown_option_and_name():
    with pytest.raises(UserError, match="unknown config key 'fedavg.beta'"):
        aggregate("fedavg", np.zeros(2), np.zeros((2, 2)), beta=1)
    with pytest.raises(UserError, match="unknown defense 'nope'; choose one of: .*fdcr.*fedavg"):
        aggregate("nope", np.zeros(2), np.zeros((2, 2)))


def test_aggregate_accepts_a_defense_instance():
    d = create("fedavg")
    res = aggregate(d, np.zeros(2), np.ones((2, 2)))
    np.testing.assert_allclose(res.weights, [1.0, 1.0])
    with pytest.raises(UserError, match="not both"):
        aggregate(d, np.zeros(2), np.ones((2, 2)), fcdc=False)


def test_package_exports():
    for name in ("aggregate", "available", "create", "AggregateResult", "register", "RoundInputs"):
        assert hasattr(defenses, name)
