"""The typed config: YAML files plus dotted overrides, validated before any work starts.

OmegaConf merges the YAML file and the ``key.sub=value`` overrides; pydantic validates the
result against the schema below (unknown keys and bad values are ``UserError``s naming the
key and, where there are any, the valid choices). Every defense contributes its own section
``<defense name>.*`` from its ``Options`` model, so adding a defense needs no change here.

Defaults reproduce the paper's setting (docs/SPEC.md section 6).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fdcr_mpi.errors import UserError, describe_validation_error

MAX_ROUNDS = 1_000_000
MAX_CLIENTS = 1_000_000  # the launch lists every client id before the data are read
INT_LIMIT = 2**31 - 1  # every integer option, a defense's too, must fit a C int
MAX_KEY_PARTS = 16  # no config key has more than 3 parts; deeper override keys are refused unparsed


class Section(pydantic.BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset: Literal["cifar10", "mnist", "fmnist", "usps", "digits", "synthetic"] = "cifar10"
    root: str | None = None
    download: bool = False
    mirror: str | None = None
    """Where data.download fetches from instead of torchvision's servers: a URL (https://,
    file://) of a folder with the same files (a site's own copy)."""
    num_clients: int = pydantic.Field(10, ge=1, le=MAX_CLIENTS)
    beta: float | Literal["iid"] = 0.5
    train_samples: int | None = pydantic.Field(None, ge=10)  # a seeded subset of the training set
    min_client_size: int = pydantic.Field(10, ge=1)
    val_fraction: float = pydantic.Field(0.1, gt=0, lt=1)
    proxy_size: int = pydantic.Field(256, ge=1)
    normalization: Literal["spec", "released"] = "spec"
    """spec: CIFAR-10 std (0.2470, 0.2435, 0.2615) (docs/SPEC.md section 3); released: the
    released code's (0.2023, 0.1994, 0.2010) (``fdcr_mpi.data.released``). Grayscale: the same."""

    @pydantic.field_validator("beta")
    @classmethod
    def _positive_beta(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not v > 0:
            raise ValueError("beta must be a positive number or 'iid'")
        return v


class AttackConfig(Section):
    """Who attacks and how (docs/SPEC.md section 3, plus attacks beyond the paper).

    kind: ``badnets`` (the trigger of ``trigger.pattern`` on a fixed half of each attacker's
    samples), ``dba`` (the trigger split into parts, one per attacker; the full trigger at
    test time), or ``none`` (a clean run). scale: model replacement, an attacker sends
    w_t + scale (w_k - w_t). fisher: what an attacker reports as its Fisher vector:
    ``honest`` (on its poisoned data, as the paper), ``uniform`` (a constant vector),
    ``mimic`` (the Fisher of its clean samples only, as a benign client would report) or
    ``noise`` (N(0, 1) noise on every parameter: what the released FDCR code substitutes for
    the attackers' Fisher vectors, here reported by the attackers themselves) or ``adaptive``
    (the vector that minimises the attacker's FDCR discrepancy V_k, crafted with knowledge of
    the protocol and of ``knowledge``'s rows: attacks.adaptive_fisher).
    poisoning: ``fixed`` (a seeded subset of exactly round(poison_rate n) samples) or
    ``bernoulli`` (each sample independently with probability poison_rate, as the released code).
    augmentation: ``fresh`` (an attacker's batches are augmented anew every epoch, as a benign
    client's) or ``frozen`` (augmented once when its data is built, as the released code).
    """

    kind: str = "badnets"
    """The attack (fdcr_mpi/attacks, ``fdcr-mpi list attacks``): badnets, dba, none, or a plugin's."""
    malicious_ratio: float = pydantic.Field(0.3, ge=0, lt=1)
    malicious_ids: Literal["last", "random"] = "last"
    target_label: int = pydantic.Field(2, ge=0)
    poison_rate: float = pydantic.Field(0.5, gt=0, le=1)
    scale: float = pydantic.Field(1.0, gt=0)
    fisher: Literal["honest", "uniform", "mimic", "noise", "adaptive"] = "honest"
    poisoning: Literal["fixed", "bernoulli"] = "fixed"
    augmentation: Literal["fresh", "frozen"] = "fresh"
    pgd_radius: float | None = pydantic.Field(None, gt=0)
    """An attacker's sent update projected onto the L2 ball of this radius around w_t (after its attack's
    own change; any attack; Attack.send); null: no projection."""
    pgd_every: int | None = pydantic.Field(None, ge=1)
    """With pgd_radius: the attacker's weights also projected onto that ball after every n-th local SGD
    step and at the end of its training (PGD during training, Attack.train; the attacker then trains
    outside its batched group); null: projected once, at the end (pgd_radius alone)."""
    knowledge: Literal["omniscient", "attackers"] = "omniscient"
    """What colluding attacks (lie, min_max, ...) craft from: every benign participant's update of the
    round (omniscient) or the attackers' own honest updates only (attacks.collusion)."""


class TriggerConfig(Section):
    pattern: Literal["paper", "solid"] = "paper"
    value: float = 1.0


class TrainConfig(Section):
    local_epochs: int = pydantic.Field(10, ge=0)
    lr: float = pydantic.Field(0.01, gt=0)
    momentum: float = pydantic.Field(0.9, ge=0, lt=1)
    weight_decay: float = pydantic.Field(1e-5, ge=0)
    batch_size: int = pydantic.Field(64, ge=1)
    drop_last: bool = True
    batch_clients: int | Literal["auto"] = pydantic.Field("auto")
    """Train the clients of a rank in groups of this many ids ([jG, (j+1)G)) as one batched
    computation (torch.func vmap); 1 trains them one after another. Groups never span ranks.
    ``auto`` (the default) is resolved when the config is validated, from the config alone
    (``auto_batch_clients``), and the run file stores the number."""

    @pydantic.field_validator("batch_clients")
    @classmethod
    def _at_least_one(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto)")
        return value


class FisherConfig(Section):
    """estimator: ``empirical`` (Eq. 5: the mean of per-sample squared gradients), ``batch_mean_sq``
    ((mean batch gradient)^2 of the cross-entropy), or ``released`` (the released code's:
    (mean batch gradient)^2 of log_softmax(logits)[:, labels].mean() on shuffled, augmented
    training batches; ``fdcr_mpi.client.fisher_released``)."""

    estimator: Literal["empirical", "batch_mean_sq", "released"] = "empirical"
    max_samples: int | None = pydantic.Field(None, ge=1)
    chunk_size: int | None = pydantic.Field(None, ge=1)
    backend: Literal["layers", "vmap"] = "layers"  # how per-sample gradients are summed (same F)


class ModelConfig(Section):
    name: Literal["simple_cnn", "cnn_1m", "resnet18"] = "simple_cnn"


class DefenseConfig(Section):
    name: str = "fdcr"
    path: Literal["auto", "gather", "reduce"] = "auto"
    """How the server combines the clients: ``gather`` every (K, D) row to rank 0, or ``reduce``
    (fedavg and fdcr only): exact integer reductions of D-vectors plus a gather of K scalars, so
    the server's memory does not grow with K x D. ``auto``: reduce from REDUCE_FROM clients on."""


class EvalConfig(Section):
    batch_size: int = pydantic.Field(1000, ge=1)
    test_samples: int | None = pydantic.Field(None, ge=1)  # a seeded subset of the test set (quick sweeps)
    final_rounds: int = pydantic.Field(5, ge=1)


class FaultConfig(Section):
    """Fault injection for resilience tests: what goes wrong, on which rank, client and round.

    ``raise``: the rank raises; ``exit``: the rank's process dies; ``nan``/``inf``: the client
    reports a non-finite update; ``short``: the client reports a Fisher vector of zeros but
    claims no samples (an invalid row). Off (``none``) by default.
    """

    kind: Literal["none", "raise", "exit", "nan", "inf", "short"] = "none"
    rank: int = pydantic.Field(0, ge=0)
    client: int | None = pydantic.Field(None, ge=0)
    round: int = pydantic.Field(0, ge=0)


MAX_THREADS = 4096  # more cores than any node has


class RuntimeConfig(Section):
    """How the run executes; none of it is in the config hash.

    ``threads``, ``parallel_eval``, ``malloc`` and the checkpoint settings never change a result.
    ``client_threads``, ``device``, ``deterministic`` and ``tf32`` decide how the arithmetic is
    done: they are recorded in the run file's numerics fingerprint, and a resume that would
    change them stops unless told otherwise (runtime.numerics).
    """

    threads: int | None = pydantic.Field(None, ge=1, le=MAX_THREADS)
    """CPU cores this rank uses (null: the cores of its node, or of its SLURM task, shared by the
    node's client ranks). They train ``threads // client_threads`` clients at once: the spare
    cores work on other clients, never inside one client's arithmetic."""
    client_threads: int = pydantic.Field(1, ge=1, le=MAX_THREADS)
    """Intra-op threads of one client's training and Fisher, and of the server's defense: a fixed
    number, so the results never depend on the node's core count or the number of ranks."""
    deterministic: bool = True
    """On a GPU: deterministic kernels only (torch.use_deterministic_algorithms, cuDNN
    deterministic, no autotuning, a fixed cuBLAS workspace); the CPU is deterministic anyway."""
    tf32: bool = False
    """On a GPU: let float32 matrix products and convolutions use TF32 (faster, other numbers)."""
    malloc: Literal["tuned", "default"] = "tuned"
    """tuned: raise glibc's mmap and trim thresholds so activations are reused, not page-faulted
    (runtime.allocator); default: leave the C allocator as it is."""
    parallel_eval: bool = True
    """Under MPI the client ranks evaluate each round's model on shares of the test sets and
    rank 0 sums their counts (the same figures); false: rank 0 evaluates alone and the other
    ranks hold no test set."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """The device of the clients' computations (the server, rank 0, computes on its CPU): auto
    takes a GPU when one is visible (runtime.placement)."""
    tensorboard: bool = True
    """Rank 0 writes TensorBoard event files into ``<out>/tensorboard`` (store.tensorboard)."""
    wandb: bool = False
    """Rank 0 logs the run to Weights & Biases in offline mode, into ``<out>/wandb`` (store.wandb_log;
    the ``wandb`` extra); upload later with ``wandb sync``."""
    wandb_project: str = pydantic.Field("fdcr_mpi", min_length=1, max_length=128)
    """The W&B project the offline run syncs into."""
    checkpoint_every: int = pydantic.Field(1, ge=1)
    keep_checkpoints: int = pydantic.Field(3, ge=1)
    save_weights_every: int = pydantic.Field(0, ge=0)
    fault: FaultConfig = FaultConfig()


AUTO_GROUP = 5
"""``train.batch_clients: auto`` for a model without BatchNorm: five clients per batched group.
A client's batched arithmetic equals its one-by-one arithmetic only to float rounding, and differs
with the group it trains in, so the group size is a function of the config alone: it cannot follow
the clients per rank without making results depend on the launch. Five keeps two groups of the
paper's ten clients, one per core of a two-core machine or per client rank of ``mpiexec -n 3``, and
the stacked weights and momenta of five models are small beside the activations of a step (which
``client.batched.CHUNK`` bounds). The launch line says when groups leave workers idle
(``runtime.driver.placement_line``)."""


def auto_batch_clients(model_name: str) -> int:
    """``train.batch_clients: auto`` resolved: 1 for a model with BatchNorm (its batch statistics
    cannot be vmapped per client), else ``AUTO_GROUP``."""
    return 1 if model_name == "resnet18" else AUTO_GROUP


class BaseConfig(Section):
    plugins: list[str] = []
    """Modules (or .py files) of the user's own defenses and attacks, imported first (fdcr_mpi.plugins)."""
    seed: int = pydantic.Field(0, ge=0)
    rounds: int = pydantic.Field(50, ge=1, le=MAX_ROUNDS)
    clients_per_round: int | None = pydantic.Field(None, ge=1)
    """Partial participation: this many clients, drawn afresh each round (seeded); null: all."""
    data: DataConfig = DataConfig()
    attack: AttackConfig = AttackConfig()
    trigger: TriggerConfig = TriggerConfig()
    train: TrainConfig = TrainConfig()
    fisher: FisherConfig = FisherConfig()
    model: ModelConfig = ModelConfig()
    defense: DefenseConfig = DefenseConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @pydantic.model_validator(mode="after")
    def _resolve_batch_clients(self) -> BaseConfig:
        """``train.batch_clients: auto`` becomes its number, so the config hash and the run file hold it."""
        if self.train.batch_clients == "auto":
            self.train = self.train.model_copy(update={"batch_clients": auto_batch_clients(self.model.name)})
        return self


def _schema() -> type[BaseConfig]:
    """BaseConfig plus one section per registered defense, and per registered attack that has
    options, built from its ``Options``."""
    from fdcr_mpi import attacks
    from fdcr_mpi.defenses import available

    sections = {name: (cls.Options, cls.Options()) for name, cls in available().items()
                if name not in BaseConfig.model_fields}
    for name, cls in attacks.available().items():
        if cls.Options.model_fields and name not in BaseConfig.model_fields:
            if name in sections:
                raise UserError(f"attack {name!r} and defense {name!r} would share the config section {name!r}; "
                                "rename one of them")
            sections[name] = (cls.Options, cls.Options())
    return pydantic.create_model("Config", __base__=BaseConfig, **sections)  # type: ignore[call-overload]


Config = BaseConfig  # the type to annotate with; instances are of the generated subclass


def _load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        return OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, OSError, RecursionError) as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(f"config file {path} is not a valid YAML mapping: {reason}") from None


def _parse_overrides(overrides: list[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r} is not of the form key.sub=value")
        key = item.split("=", 1)[0]
        if key.count(".") >= MAX_KEY_PARTS:
            raise UserError(f"override key '{key[:40]}...' has {key.count('.') + 1} parts; "
                            "no config key has more than 3 (section.sub.key)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError, TypeError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise UserError(f"could not parse the overrides {overrides}: {reason}") from None


def validate(data: Any) -> BaseConfig:
    """Validate a plain dict against the schema; one ``UserError`` sentence on the first problem.
    The config's ``plugins`` are imported first: their defenses and attacks are part of the schema."""
    if not isinstance(data, dict):
        raise UserError("the config must be a mapping of sections (data:, attack:, ...)")
    plugins = data.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise UserError("config key 'plugins' must be a list of module names or .py files")
    from fdcr_mpi.plugins import import_plugins

    import_plugins(plugins)
    schema = _schema()
    try:
        config = schema.model_validate(data)
    except pydantic.ValidationError as exc:
        raise UserError(describe_validation_error(exc, schema=schema)) from None
    except RecursionError:
        raise UserError("the config is nested too deeply to be a config") from None
    _check_numbers(config)
    _check_consistency(config)
    return config


def _check_numbers(section: pydantic.BaseModel, prefix: str = "") -> None:
    """Every float finite, every integer within a C int, every seed 0 or more (defense sections too)."""
    for name in type(section).model_fields:
        value, key = getattr(section, name), f"{prefix}{name}"
        if isinstance(value, pydantic.BaseModel):
            _check_numbers(value, f"{key}.")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key '{key}' has the invalid value {value!r}: it must be a finite number")
        elif isinstance(value, int) and not -INT_LIMIT <= value <= INT_LIMIT:
            raise UserError(f"config key '{key}' has the invalid value {value}: it must lie between "
                            f"{-INT_LIMIT} and {INT_LIMIT}")
        elif name == "seed" and value < 0:
            raise UserError(f"config key '{key}' has the invalid value {value}: a seed must be 0 or more")


def _check_consistency(config: BaseConfig) -> None:
    """Checks that span sections."""
    from fdcr_mpi import attacks
    from fdcr_mpi.defenses import available

    if config.attack.kind not in attacks.available():
        raise UserError(f"config key 'attack.kind' has the invalid value {config.attack.kind!r}; "
                        f"choose one of: {', '.join(attacks.available())}")
    names = available()
    if config.defense.name not in names:
        raise UserError(f"config key 'defense.name' has the invalid value {config.defense.name!r}; "
                        f"choose one of: {', '.join(names)}")
    if config.attack.target_label >= 10:
        raise UserError(f"config key 'attack.target_label' is {config.attack.target_label}, "
                        "but the datasets have 10 classes (0-9)")
    _check_participation(config, names[config.defense.name])
    if config.defense.path == "reduce" and attacks.available()[config.attack.kind].colludes:
        raise UserError(f"attack {config.attack.kind!r} crafts the attackers' updates from the round's updates on "
                        "the server, which the reduce path never gathers; use defense.path=gather or auto")
    if config.defense.path == "reduce" and config.attack.fisher == "adaptive":
        raise UserError("attack.fisher=adaptive forges the attackers' Fisher vectors from the round's rows on the "
                        "server, which the reduce path never gathers; use defense.path=gather or auto")
    if config.attack.pgd_every is not None and config.attack.pgd_radius is None:
        raise UserError("config key 'attack.pgd_every' projects onto the ball of radius attack.pgd_radius, "
                        "which is not set; set attack.pgd_radius or leave attack.pgd_every null")
    if attacks.available()[config.attack.kind].has_attackers:
        attackers = int(config.attack.malicious_ratio * config.data.num_clients)
        if config.attack.malicious_ratio > 0 and attackers == 0:
            raise UserError(f"attack.malicious_ratio {config.attack.malicious_ratio} gives no attacker "
                            f"among {config.data.num_clients} clients; raise it or set attack.kind=none")


REDUCE_FROM = 100  # defense.path auto: the reduce path from this many clients per round on


def aggregation_path(config: BaseConfig) -> str:
    """``gather`` or ``reduce``: ``defense.path`` with ``auto`` resolved."""
    from fdcr_mpi import attacks
    from fdcr_mpi.defenses import available

    if config.defense.path != "auto":
        return config.defense.path
    if attacks.available()[config.attack.kind].colludes or config.attack.fisher == "adaptive":
        return "gather"  # the attackers' rows meet on the server (attacks.collusion)
    reducible = available()[config.defense.name].reducible
    return "reduce" if reducible and participants(config) >= REDUCE_FROM else "gather"


def parallel_eval(config: BaseConfig, ranks: int) -> bool:
    """Whether the client ranks evaluate each round's model (``runtime.parallel_eval`` under MPI)."""
    return config.runtime.parallel_eval and ranks > 1


def participants(config: BaseConfig) -> int:
    """The number of clients that train each round."""
    return config.clients_per_round or config.data.num_clients


def _check_participation(config: BaseConfig, defense: type) -> None:
    k, m = config.data.num_clients, config.clients_per_round
    if m is not None and m > k:
        raise UserError(f"config key 'clients_per_round' is {m}, more than the {k} clients (data.num_clients)")
    if m is not None and m < k and defense.keeps_client_history:
        raise UserError(f"defense {config.defense.name!r} keeps a history per client and needs every client "
                        "every round; set clients_per_round to null")
    if config.defense.path == "reduce" and not defense.reducible:
        raise UserError(f"defense {config.defense.name!r} needs every client's update on the server; "
                        "defense.path=reduce works with fedavg and fdcr only")
    if config.train.batch_clients > 1 and config.model.name == "resnet18":
        raise UserError("train.batch_clients > 1 needs a model without BatchNorm (simple_cnn or cnn_1m)")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                warn_unused: bool = True) -> BaseConfig:
    """The validated config from an optional YAML file and dotted overrides (later wins).

    ``warn_unused``: warn about options set for a defense the run does not use (a sweep, whose
    runs share the options of every defense it compares, turns it off)."""
    parts = [OmegaConf.create({})]
    if path is not None:
        parts.append(_load_yaml(path))
    if overrides:
        parts.append(_parse_overrides(list(overrides)))
    if path is not None and not isinstance(parts[1], DictConfig):
        raise UserError(f"config file {path} must be a mapping of sections (data:, attack:, ...)")
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(*parts), resolve=True)
    except (OmegaConfBaseException, TypeError, ValueError, RecursionError) as exc:
        raise UserError(f"could not merge the config: {str(exc).splitlines()[0]}") from None
    config = validate(merged)
    if warn_unused:
        warn_unused_options(config, merged)
    return config


def warn_unused_options(config: BaseConfig, given: dict[str, Any]) -> None:
    """A warning for each option section the user set of a defense this run does not use (its
    values are ignored, and left out of the config hash)."""
    from fdcr_mpi import attacks
    from fdcr_mpi.defenses import available

    for names, role, used in ((available(), "defense", config.defense.name),
                              (attacks.available(), "attack", config.attack.kind)):
        for name in names:
            if name != used and given.get(name):
                keys = ", ".join(f"{name}.{key}" for key in given[name])
                warnings.warn(f"{keys} set, but the {role} is {used}: ignored", UserWarning, stacklevel=3)


def to_yaml(config: BaseConfig) -> str:
    """The resolved config as YAML text (stored in the run file; loads back to the same config)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def from_yaml(text: str) -> BaseConfig:
    """Inverse of ``to_yaml``; text that is not YAML is a UserError."""
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"the config text is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data["train"].setdefault("batch_clients", 1)  # written before the key existed: one by one, as then
    return validate(data)


HASH_NEUTRAL: dict[str, Any] = {
    "data.normalization": "spec", "attack.poisoning": "fixed", "attack.augmentation": "fresh",
    "attack.knowledge": "omniscient", "attack.pgd_radius": None, "attack.pgd_every": None,
    "fdcr.variant": "paper", **{f"{name}.variant": "original" for name in (
        "multi_krum", "trimmed_median", "bulyan", "foolsgold", "sageflow", "crfl", "dnc")},
}
"""Keys added after run files existed, with the value that reproduces the runs made before them:
left at that value they stay out of the hash, so those runs keep their hash (and resume)."""


def config_hash(config: BaseConfig) -> str:
    """sha256 of everything that decides the results (``hashed_values``)."""
    return hashlib.sha256(json.dumps(hashed_values(config), sort_keys=True).encode()).hexdigest()[:16]


def config_differences(stored: BaseConfig, config: BaseConfig, most: int = 4) -> str:
    """'train.batch_clients (1 there, 5 here), seed (0 there, 1 here)': the hashed keys in which two
    configs differ, at most ``most`` of them ('' when none); the option sections that only one of
    them uses are left out (the defense or attack name that differs says it)."""
    def flat(data: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    a, b = hashed_values(stored), hashed_values(config)
    there, here = flat(a), flat(b)
    both = a.keys() & b.keys()  # an option section of a defense or attack only one side uses: its name says it
    keys = sorted(k for k in there.keys() | here.keys() if there.get(k) != here.get(k) and k.split(".")[0] in both)
    parts = [f"{k} ({there.get(k, 'unset')} there, {here.get(k, 'unset')} here)" for k in keys[:most]]
    return ", ".join(parts) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def hashed_values(config: BaseConfig) -> dict[str, Any]:
    """The config's values that decide the results, as nested plain data.

    Left out: ``runtime``, the data paths, the option sections of the defenses this run does
    not use (changing another defense's defaults must not orphan a finished run), and the
    ``HASH_NEUTRAL`` keys at their neutral values.
    """
    from fdcr_mpi import attacks
    from fdcr_mpi.defenses import available

    data = config.model_dump(mode="json")
    data.pop("runtime", None)
    data.pop("plugins", None)
    for name in available():
        if name != config.defense.name:
            data.pop(name, None)
    for name in attacks.available():
        if name != config.attack.kind:
            data.pop(name, None)
    data["data"].pop("root", None)
    data["data"].pop("download", None)
    data["data"].pop("mirror", None)
    for dotted, neutral in HASH_NEUTRAL.items():
        section, key = dotted.split(".")
        if section in data and data[section].get(key, neutral) == neutral:
            data[section].pop(key, None)
    return data
