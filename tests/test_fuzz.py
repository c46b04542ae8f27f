"""Property-based: random and malformed configs and command lines end in one sentence and exit 2."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fdcr_mpi.cli import main
from fdcr_mpi.config import BaseConfig, load_config
from fdcr_mpi.errors import UserError


def known_keys() -> list[str]:
    config = load_config(None)
    keys: list[str] = []

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(f"{prefix}{name}.", getattr(value, name))
        else:
            keys.append(prefix.rstrip("."))

    walk("", config)
    return keys


KEYS = known_keys()
junk_text = st.text(alphabet=string.ascii_letters + string.digits + "._-[]{}:,'\" =/\\", max_size=12)
values = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "null", "iid", "[]", "{}", "[1, 2]", "{a: 1}", "", "~", "'x'", "1e309"]),
    junk_text)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".extra"),
                 st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True))
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides)
def test_random_overrides_give_a_config_or_one_sentence(items: list[str]) -> None:
    try:
        config = load_config(None, items)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 400
        assert "Traceback" not in message
    else:
        assert isinstance(config, BaseConfig)


yaml_docs = st.one_of(
    st.text(max_size=60),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                         st.dictionaries(st.sampled_from(["data", "attack", "fdcr", "seed", "rounds",
                                                                          "beta", "x", "train"]), inner, max_size=3)),
                 max_leaves=8).map(repr))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(yaml_docs)
def test_random_yaml_files_give_a_config_or_one_sentence(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except UserError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides)
def test_the_command_line_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, items: list[str]) -> None:
    try:
        load_config(None, items)
    except UserError:
        pass
    else:
        return  # a valid config would start a run; the validation path is what is under test
    code = main(["run", *items, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fdcr-mpi: error: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing was created before the config was valid


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["frobnicate"], [], ["run", "--out"], ["inspect"],
                                  ["list", "nothing"], ["run", "--index", "x"]])
def test_malformed_command_lines_are_one_line(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "error:" in err


def test_missing_run_directory_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["resume", str(tmp_path / "nothing")]) == 2
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 2
