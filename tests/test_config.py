"""Config loading, overrides, validation and hashing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdcr_mpi.config import AUTO_GROUP, config_hash, from_yaml, load_config, to_yaml
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


# config_hash of these configs before the variant and released options existed (commit a6c3979):
# left at their defaults, the new keys must not change them, or older runs could not resume. Those
# runs trained one client at a time, as their stored configs say (train.batch_clients: 1; the default
# is now auto, which resolves to 5 and is another config).
HASHES_BEFORE_VARIANTS = {
    (): "11c44c99de688b9f",
    ("defense.name=fedavg",): "f6ac5e9cb35ad2d2",
    ("defense.name=dnc",): "205e49de70a34d8c",
    ("defense.name=crfl",): "cc3c631f8e839f94",
    ("defense.name=multi_krum",): "d6fb1f83fcf11935",
    ("defense.name=foolsgold", "data.dataset=cifar10"): "a693d240a71132bb",
    ("defense.name=sageflow", "data.dataset=fmnist", "attack.malicious_ratio=0.2"): "e44e23515ecb67e0",
    ("defense.name=bulyan",): "4df0371a955a15af",
    ("defense.name=trimmed_median",): "d5af1bf345cca6ac",
}


@pytest.mark.parametrize("overrides", list(HASHES_BEFORE_VARIANTS))
def test_new_options_at_their_defaults_keep_older_runs_hashes(overrides: tuple[str, ...]) -> None:
    assert config_hash(load_config(None, [*overrides, "train.batch_clients=1"])) == HASHES_BEFORE_VARIANTS[overrides]


def test_batch_clients_auto_is_resolved_from_the_config_into_the_stored_number() -> None:
    assert load_config(None).train.batch_clients == AUTO_GROUP == 5
    assert load_config(None, ["model.name=resnet18"]).train.batch_clients == 1  # BatchNorm: one by one
    assert load_config(None, ["train.batch_clients=auto"]).model_dump() == load_config(None).model_dump()
    assert config_hash(load_config(None)) == config_hash(load_config(None, ["train.batch_clients=5"]))
    assert config_hash(load_config(None)) != config_hash(load_config(None, ["train.batch_clients=1"]))
    assert "batch_clients: 5" in to_yaml(load_config(None))  # the run file stores the number
    for bad, said in (("0", "at least 1"), ("many", "a valid integer or 'auto'"), ("2.5", "a valid integer or 'auto'")):
        with pytest.raises(UserError, match=said):
            load_config(None, [f"train.batch_clients={bad}"])


@pytest.mark.parametrize("override", ["fdcr.variant=released", "attack.poisoning=bernoulli",
                                      "attack.augmentation=frozen", "data.normalization=released",
                                      "fisher.estimator=released"])
def test_a_released_option_changes_the_hash(override: str) -> None:
    assert config_hash(load_config(None, [override])) != HASHES_BEFORE_VARIANTS[()]


@pytest.mark.parametrize("name", ["multi_krum", "trimmed_median", "bulyan", "foolsgold", "sageflow", "crfl", "dnc"])
def test_every_marsfl_baseline_has_a_variant_option(name: str) -> None:
    base = config_hash(load_config(None, [f"defense.name={name}"]))
    assert config_hash(load_config(None, [f"defense.name={name}", f"{name}.variant=marsfl"])) != base
    with pytest.raises(UserError, match="variant"):
        load_config(None, [f"defense.name={name}", f"{name}.variant=paper"])


def test_dnc_filter_fraction_can_follow_the_attack_ratio() -> None:
    config = load_config(None, ["attack.malicious_ratio=0.2", "dnc.filter_fraction=${attack.malicious_ratio}"])
    assert config.dnc.filter_fraction == 0.2


def test_a_stored_config_without_batch_clients_trains_one_by_one_as_its_code_did() -> None:
    text = to_yaml(load_config(None, ["train.batch_clients=1"])).replace("  batch_clients: 1\n", "")
    assert "batch_clients" not in text
    assert from_yaml(text).train.batch_clients == 1
    assert config_hash(from_yaml(text)) == config_hash(load_config(None, ["train.batch_clients=1"]))


def test_the_start_up_note_says_when_batched_groups_leave_ranks_or_workers_idle() -> None:
    from fdcr_mpi.runtime.driver import idle_note

    assert idle_note(10, 5, 3, 1) is None  # two groups, two client ranks
    assert idle_note(10, 1, 11, 1) is None  # one by one: never
    assert idle_note(10, 5, 1, 2) is None  # one process, two workers, two groups
    note = idle_note(10, 5, 11, 1)
    assert "2 batched groups" in note and "8 of the 10 client ranks have no client" in note
    assert "6 of the 8 worker threads" in idle_note(10, 5, 1, 8)
    assert "1 batched group of" in idle_note(4, 5, 3, 1)


def test_config_differences_name_the_hashed_keys_that_differ_and_nothing_else() -> None:
    from fdcr_mpi.config import config_differences

    base = load_config(None, ["train.batch_clients=1"])
    assert config_differences(base, load_config(None, ["train.batch_clients=1", "runtime.threads=1",
                                                       "data.root=/x"])) == ""  # not hashed
    assert config_differences(base, load_config(None)) == "train.batch_clients (1 there, 5 here)"
    other = load_config(None, ["defense.name=fedavg", "seed=3", "attack.pgd_radius=0.5"])
    said = config_differences(base, other)
    assert said == ("attack.pgd_radius (unset there, 0.5 here), defense.name (fdcr there, fedavg here), "
                    "seed (0 there, 3 here), train.batch_clients (1 there, 5 here)")  # fdcr.* left out
    assert config_differences(base, other, most=2).endswith("and 2 more")
