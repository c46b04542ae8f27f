"""Config loading, overrides, validation and hashing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdcr_mpi.config import config_hash, from_yaml, load_config, to_yaml
from fdcr_mpi.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_reproduce_the_paper() -> None:
    c = load_config(None)
    assert (c.data.num_clients, c.rounds, c.train.local_epochs, c.model.name) == (10, 50, 10, "simple_cnn")
    assert (c.data.beta, c.attack.malicious_ratio, c.attack.target_label) == (0.5, 0.3, 2)
    assert (c.train.lr, c.train.momentum, c.train.weight_decay, c.train.batch_size) == (0.01, 0.9, 1e-5, 64)
    assert c.defense.name == "fdcr" and c.fdcr.discrepancy == "mse" and c.fdcr.clustering == "finch"
    assert c.fisher.estimator == "empirical" and c.trigger.pattern == "paper"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    c = load_config(REPO / "configs" / "quickstart.yaml",
                    ["defense.name=fedavg", "data.beta=0.3", "fdcr.discrepancy=l2", "data.beta=iid"])
    assert c.data.dataset == "digits" and c.defense.name == "fedavg"
    assert c.data.beta == "iid" and c.fdcr.discrepancy == "l2"


def test_yaml_round_trip_and_hash() -> None:
    c = load_config(REPO / "configs" / "quickstart.yaml")
    again = from_yaml(to_yaml(c))
    assert again.model_dump() == c.model_dump() and config_hash(again) == config_hash(c)
    assert config_hash(load_config(None, ["runtime.threads=1", "data.root=/x"])) == config_hash(load_config(None))
    assert config_hash(load_config(None, ["seed=1"])) != config_hash(load_config(None))
    # Only the selected defense's options count.
    assert config_hash(load_config(None, ["crfl.sigma=0.5"])) == config_hash(load_config(None))
    assert config_hash(load_config(None, ["fdcr.discrepancy=l2"])) != config_hash(load_config(None))


@pytest.mark.parametrize(("overrides", "words"), [
    (["data.bogus=1"], "unknown config key 'data.bogus'"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["fdcr.clustering=spectral"], "'fdcr.clustering' has the invalid value 'spectral'; choose one of"),
    (["data.dataset=imagenet"], "'data.dataset'"),
    (["data.beta=-1"], "'data.beta'"),
    (["rounds=0"], "'rounds'"),
    (["train.lr=abc"], "'train.lr'"),
    (["defense.name=nope"], "choose one of"),
    (["attack.malicious_ratio=0.05"], "gives no attacker"),
    (["data.beta"], "not of the form"),
])
def test_bad_values_are_one_sentence(overrides: list[str], words: str) -> None:
    with pytest.raises(UserError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not a valid YAML mapping"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError):
        load_config(scalar)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs").glob("[!s]*/*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_validates(path: Path) -> None:
    load_config(path)
