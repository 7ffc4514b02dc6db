"""params.yaml → typed config: strict loading, DVC-style overrides, and the CLI's exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_tasks.config import Params, apply_overrides, load_params
from rlhf_tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


def _raw() -> dict:
    return yaml.safe_load(PARAMS.read_text(encoding="utf-8"))


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# -- the repo's params.yaml ---------------------------------------------------------------------


def _differences(typed: object, raw: object, key: str = "") -> list[str]:
    """Where ``typed`` (a config dumped by alias) does not hold ``raw``'s value, key by key."""
    if isinstance(raw, dict):
        if not isinstance(typed, dict):
            return [f"{key}: {typed!r} is not a section"]
        return [
            diff
            for k, v in raw.items()
            for diff in _differences(typed.get(k, "<missing>"), v, f"{key}.{k}".lstrip("."))
        ]
    # The same value of the same type; an integer may stand for a float (``7200`` for 7200.0).
    same_type = type(typed) is type(raw) or (type(typed), type(raw)) == (float, int)
    return [] if typed == raw and same_type else [f"{key}: {typed!r} != {raw!r}"]


def test_repo_params_load():
    """Every value written in params.yaml reaches the typed config as written: no key is dropped,
    renamed or changed on the way (``validate`` is the field ``validate_``)."""
    params = load_params(PARAMS)
    raw = _raw()
    assert _differences(params.model_dump(by_alias=True), raw) == []
    # Values come from the file, not from the defaults (every section is read).
    assert params.data.dir == raw["data"]["dir"]
    assert params.demo.seed == raw["demo"]["seed"]
    assert params.model.name_or_path == raw["model"]["name_or_path"]
    assert params.base_model.num_layers == raw["base_model"]["num_layers"]
    assert params.validate_config.min_rows == raw["validate"]["min_rows"]
    assert params.validate_config.checks.label_sanity == raw["validate"]["checks"]["label_sanity"]


def test_the_value_comparison_finds_a_changed_value():
    """``_differences`` itself can fail: a value changed, dropped or of another type is named."""
    raw = {"ppo": {"kl_coef": 0.1, "args": {"max_steps": 2}}}
    assert _differences(raw, raw) == []
    assert _differences({"ppo": {"kl_coef": 0.2, "args": {"max_steps": 2}}}, raw) == [
        "ppo.kl_coef: 0.2 != 0.1"
    ]
    assert _differences({"ppo": {"args": {"max_steps": "2"}}}, raw) == [
        "ppo.kl_coef: '<missing>' != 0.1",
        "ppo.args.max_steps: '2' != 2",
    ]
    assert _differences({"n": True}, {"n": 1}) == ["n: True != 1"]  # equal, not the same
    assert _differences({"n": 7200.0}, {"n": 7200}) == []


def test_repo_params_sections_match_the_model():
    """Every section of params.yaml is a field of Params (and the reverse), so none is ignored."""
    fields = {info.alias or name for name, info in Params.model_fields.items()}
    assert set(_raw()) == fields


def test_values_from_a_file_override_the_defaults(tmp_path: Path):
    raw = _raw()
    raw["validate"]["min_rows"] = 7
    raw["demo"]["heldout_fraction"] = 0.3
    params = load_params(_write(tmp_path, raw))
    assert params.validate_config.min_rows == 7
    assert params.demo.heldout_fraction == 0.3


def test_missing_file_is_a_config_error_with_advice_for_the_cli_and_a_deployment(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file") as info:
        load_params(tmp_path / "nope.yaml")
    assert "--params PATH" in str(info.value) and "-p params_path=PATH" in str(info.value)


def test_invalid_yaml_is_a_config_error(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("validate: [min_rows: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_non_mapping_is_a_config_error(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(path)


# -- unknown keys -------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path):
    raw = _raw()
    raw["trainz"] = {"lr": 1e-4}
    with pytest.raises(ConfigError) as exc:
        load_params(_write(tmp_path, raw))
    assert "trainz" in str(exc.value)
    assert "unknown key" in str(exc.value)
    assert "params.yaml" in str(exc.value)


def test_unknown_nested_key(tmp_path: Path):
    raw = _raw()
    raw["validate"]["min_rowz"] = 10
    with pytest.raises(ConfigError) as exc:
        load_params(_write(tmp_path, raw))
    assert "validate.min_rowz" in str(exc.value)
    assert "unknown key" in str(exc.value)


def test_unknown_deeply_nested_key(tmp_path: Path):
    raw = _raw()
    raw["validate"]["checks"]["label_sanityy"] = "warn"
    with pytest.raises(ConfigError, match=r"validate\.checks\.label_sanityy"):
        load_params(_write(tmp_path, raw))


def test_python_field_name_is_not_accepted_for_an_aliased_section(tmp_path: Path):
    """The section is ``validate``; ``validate_`` is the Python name only, a typo in the file."""
    raw = _raw()
    raw["validate_"] = raw.pop("validate")
    with pytest.raises(ConfigError, match="validate_"):
        load_params(_write(tmp_path, raw))


def test_every_mistake_is_reported_at_once(tmp_path: Path):
    raw = _raw()
    raw["validate"]["min_rowz"] = 10
    raw["demo"]["seed"] = "abc"
    with pytest.raises(ConfigError) as exc:
        load_params(_write(tmp_path, raw))
    assert "validate.min_rowz" in str(exc.value)
    assert "demo.seed" in str(exc.value)


# -- wrong types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("validate", "min_rows", "ten"),
        ("validate", "min_rows", "10"),  # strict: a numeric string is not an int
        ("validate", "min_rows", True),  # strict: a bool is not an int
        ("validate", "max_examples", 2.5),
        ("demo", "seed", False),
        ("base_model", "num_layers", "2"),
        ("model", "trust_remote_code", 1),  # strict: an int is not a bool
        ("model", "trust_remote_code", "yes please"),
        ("data", "dir", 5),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, section: str, key: str, value: object):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(ConfigError) as exc:
        load_params(_write(tmp_path, raw))
    message = str(exc.value)
    assert f"{section}.{key}" in message
    assert repr(value) in message  # says what it got


def test_section_of_the_wrong_type(tmp_path: Path):
    raw = _raw()
    raw["validate"] = 3
    with pytest.raises(ConfigError, match="validate"):
        load_params(_write(tmp_path, raw))


def test_severity_must_be_one_of_the_three(tmp_path: Path):
    raw = _raw()
    raw["validate"]["checks"]["utf8"] = "fatal"
    with pytest.raises(ConfigError, match=r"validate\.checks\.utf8"):
        load_params(_write(tmp_path, raw))


@pytest.mark.parametrize("severity", ["error", "warn", "off"])
def test_every_documented_severity_is_accepted_in_params_yaml(tmp_path: Path, severity: str):
    """params.yaml documents ``error``, ``warn`` and ``off``, written unquoted as in the file.

    PyYAML (YAML 1.1) reads a bare ``off`` as the boolean False; the loader must still give the
    severity "off" (the repo's own comment says `off: skipped`).
    """
    text = PARAMS.read_text(encoding="utf-8").replace(
        "    label_sanity: warn", f"    label_sanity: {severity}"
    )
    assert f"label_sanity: {severity}" in text
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_params(path).validate_config.checks.label_sanity == severity


# -- impossible values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("validate.label_sanity_threshold=0.3", "validate.label_sanity_threshold"),
        ("validate.label_sanity_threshold=0.5", "validate.label_sanity_threshold"),
        ("validate.label_sanity_threshold=1.5", "validate.label_sanity_threshold"),
        ("validate.min_rows=0", "validate.min_rows"),
        ("validate.max_tokens=0", "validate.max_tokens"),
        ("demo.heldout_fraction=1", "demo.heldout_fraction"),
        ("demo.heldout_fraction=0", "demo.heldout_fraction"),
        ("demo.n_sft=0", "demo.n_sft"),
        ("base_model.vocab_size=10", "base_model.vocab_size"),
    ],
)
def test_out_of_range_value_names_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(PARAMS, [override])


def test_min_chars_above_max_chars(tmp_path: Path):
    raw = _raw()
    raw["validate"]["min_chars"] = 50
    raw["validate"]["max_chars"] = 10
    with pytest.raises(ConfigError) as exc:
        load_params(_write(tmp_path, raw))
    assert "min_chars" in str(exc.value)
    assert "max_chars" in str(exc.value)


def test_min_chars_equal_to_max_chars_is_allowed():
    params = load_params(PARAMS, ["validate.min_chars=10", "validate.max_chars=10"])
    assert params.validate_config.min_chars == params.validate_config.max_chars == 10


def test_hidden_size_not_divisible_by_num_heads(tmp_path: Path):
    raw = _raw()
    raw["base_model"]["hidden_size"] = 66
    raw["base_model"]["num_heads"] = 4
    with pytest.raises(ConfigError) as exc:
        load_params(_write(tmp_path, raw))
    assert "base_model" in str(exc.value)
    assert "num_heads" in str(exc.value)


def test_hidden_size_divisible_by_num_heads_is_allowed():
    params = load_params(PARAMS, ["base_model.hidden_size=96", "base_model.num_heads=3"])
    assert (params.base_model.hidden_size, params.base_model.num_heads) == (96, 3)


# -- -S overrides -------------------------------------------------------------------------------


def test_overrides_parse_yaml_values_and_reach_the_typed_config():
    params = load_params(
        PARAMS,
        [
            "validate.min_rows=50",
            "validate.max_tokens=64",
            "validate.label_sanity_threshold=0.95",
            "validate.checks.label_sanity=error",
            "demo.heldout_fraction=0.25",
            "model.trust_remote_code=true",
            "model.name_or_path=some-org/some-model",
        ],
    )
    v = params.validate_config
    assert v.min_rows == 50 and type(v.min_rows) is int
    assert v.max_tokens == 64
    assert v.label_sanity_threshold == 0.95
    assert v.checks.label_sanity == "error"
    assert params.demo.heldout_fraction == 0.25
    assert params.model.trust_remote_code is True
    assert params.model.name_or_path == "some-org/some-model"
    # Keys not overridden keep the file's values.
    assert v.max_chars == _raw()["validate"]["max_chars"]


def test_override_null_gives_none():
    params = load_params(PARAMS, ["validate.max_tokens=64"])
    assert params.validate_config.max_tokens == 64
    assert load_params(PARAMS, ["validate.max_tokens=null"]).validate_config.max_tokens is None


def test_later_override_wins():
    params = load_params(PARAMS, ["validate.min_rows=50", "validate.min_rows=60"])
    assert params.validate_config.min_rows == 60


def test_override_value_may_contain_equals_and_spaces():
    params = load_params(PARAMS, ["model.name_or_path=a=b", " validate.min_rows = 42"])
    assert params.model.name_or_path == "a=b"
    assert params.validate_config.min_rows == 42


def test_override_with_a_yaml_string_stays_a_string():
    """``-S validate.min_rows=ten`` is the string "ten": a type error naming the key."""
    with pytest.raises(ConfigError, match=r"validate\.min_rows"):
        load_params(PARAMS, ["validate.min_rows=ten"])
    with pytest.raises(ConfigError, match=r"validate\.min_rows"):
        load_params(PARAMS, ["validate.min_rows='50'"])  # quoted: a string, not an int


def test_override_severity_off():
    """config.py's own docstring: ``-S validate.checks.label_sanity=off`` gives a string."""
    params = load_params(PARAMS, ["validate.checks.label_sanity=off"])
    assert params.validate_config.checks.label_sanity == "off"


def test_override_of_an_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key 'validate\.min_rowz'"):
        load_params(PARAMS, ["validate.min_rowz=5"])
    with pytest.raises(ConfigError, match="unknown key 'trainz'"):
        load_params(PARAMS, ["trainz.lr=0.1"])


@pytest.mark.parametrize("override", ["validate.min_rows", "=50", " =50", ""])
def test_malformed_override_is_an_error(override: str):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_params(PARAMS, [override])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        load_params(PARAMS, ["validate.min_rows.x=1"])


def test_apply_overrides_does_not_change_its_input():
    raw = _raw()
    before = yaml.safe_dump(raw)
    result = apply_overrides(raw, ["validate.min_rows=5", "newsection.key=1"])
    assert result["validate"]["min_rows"] == 5
    assert result["newsection"] == {"key": 1}
    assert yaml.safe_dump(raw) == before


def test_params_are_frozen():
    params = load_params(PARAMS)
    with pytest.raises(Exception):  # noqa: B017 (pydantic's ValidationError; the type is theirs)
        params.validate_config.min_rows = 5
    assert params.validate_config.min_rows == _raw()["validate"]["min_rows"]


# -- through the CLI ----------------------------------------------------------------------------


def _project_params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))


def test_cli_unknown_key_in_params_yaml(project: Path, rlhf):
    raw = _project_params(project)
    raw["validate"]["min_rowz"] = 10
    _write(project, raw)
    code, out, err = rlhf("validate")
    assert code == 2
    assert "validate.min_rowz" in err
    assert "Traceback" not in err + out
    assert not (project / "artifacts").exists()  # stopped before anything ran


def test_cli_unknown_top_level_key_in_params_yaml(project: Path, rlhf):
    raw = _project_params(project)
    raw["trainz"] = {"lr": 0.1}
    _write(project, raw)
    code, out, err = rlhf("data", "demo")
    assert code == 2
    assert "trainz" in err
    assert "Traceback" not in err + out


def test_cli_wrong_type_in_params_yaml(project: Path, rlhf):
    raw = _project_params(project)
    raw["validate"]["min_rows"] = "ten"
    _write(project, raw)
    code, out, err = rlhf("validate")
    assert code == 2
    assert "validate.min_rows" in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("validate.min_rows", "KEY=VALUE"),
        ("=3", "KEY=VALUE"),
        ("validate.min_rows=ten", "validate.min_rows"),
        ("validate.min_rowz=3", "validate.min_rowz"),
        ("validate.label_sanity_threshold=0.3", "validate.label_sanity_threshold"),
    ],
)
def test_cli_bad_override(project: Path, rlhf, override: str, needle: str):
    code, out, err = rlhf("validate", "-S", override)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err + out


def test_cli_override_reaches_the_command(project: Path, rlhf):
    code, _, err = rlhf("data", "demo", "--force", "-S", "demo.n_sft=7")
    assert code == 0, err
    rows = (project / "data" / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 7


def test_cli_missing_params_file(project: Path, rlhf):
    code, out, err = rlhf("validate", "--params", "nope.yaml")
    assert code == 2
    assert "nope.yaml" in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize(
    "argv",
    [
        ("frobnicate",),
        (),
        ("data",),
        ("data", "frobnicate"),
        ("stage", "frobnicate"),
        ("validate", "--no-such-flag"),
    ],
)
def test_cli_usage_errors(project: Path, rlhf, argv: tuple[str, ...]):
    code, out, err = rlhf(*argv)
    assert code == 2
    assert "rlhf" in err
    assert "Traceback" not in err + out


def test_cli_unknown_subcommand_names_it(project: Path, rlhf):
    code, _, err = rlhf("frobnicate")
    assert code == 2
    assert "frobnicate" in err


def test_cli_config_error_in_a_real_process(tmp_path: Path):
    """The installed entry point, not just main(): exit 2, one message, no traceback."""
    raw = _raw()
    raw["validate"]["min_rowz"] = 10
    _write(tmp_path, raw)
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_tasks.cli", "validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "validate.min_rowz" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_float_written_without_a_dot_is_a_float(tmp_path) -> None:
    """YAML 1.1 (PyYAML) reads 1e-4 as a string; params read it as the float people mean, in the
    file and in an override alike."""
    path = tmp_path / "params.yaml"
    path.write_text("ppo:\n  learning_rate: 1e-4\n  value_learning_rate: 2E-5\n")
    params = load_params(path, ["ppo.cliprange=1e-1"])
    assert params.ppo.learning_rate == 1e-4 and params.ppo.value_learning_rate == 2e-5
    assert params.ppo.cliprange == 0.1
    assert load_params(path, ["tracking.experiment=1e5x"]).tracking.experiment == "1e5x"
