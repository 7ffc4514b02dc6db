"""One list of stages: dvc.yaml, the Prefect flow, the CLI and params.yaml agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from rlhf_tasks.config import Params
from rlhf_tasks.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_has_the_same_stages_in_the_same_order() -> None:
    assert list(_dvc_stages()) == list(STAGES)


def test_each_dvc_stage_calls_its_cli_stage_and_depends_on_its_module() -> None:
    for name, stage in _dvc_stages().items():
        assert stage["cmd"] == f"rlhf stage {name}"
        assert f"rlhf_tasks/{name}.py" in stage["deps"], f"{name}: its module is not a dep"
        assert (ROOT / "rlhf_tasks" / f"{name}.py").exists()


def test_each_stage_has_its_params_section_and_dvc_tracks_it() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    sections = set(Params.model_fields) | {"validate"}
    for name, stage in _dvc_stages().items():
        assert name in raw, f"params.yaml has no {name!r} section"
        assert name in stage.get("params", []), f"dvc.yaml stage {name} does not track {name!r}"
        for section in stage.get("params", []):
            assert section in raw and section in sections


def test_params_file_has_no_section_that_config_ignores() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    fields = {f.alias or n for n, f in Params.model_fields.items()}
    assert set(raw) <= fields


def test_metrics_table_shows_the_key_figures_of_the_last_run(tmp_path: Path) -> None:
    from rlhf_tasks.cli import metrics_table

    assert "no metrics yet" in metrics_table(tmp_path)
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward/metrics.json").write_text('{"reward_model/accuracy": 0.8625}')
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate/metrics.json").write_text('{"judge/win_rate_vs_sft": 0.75}')
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy/run.json").write_text('{"policy/algorithm": "grpo"}')
    lines = metrics_table(tmp_path).splitlines()
    assert lines[1].split() == ["policy", "algorithm", "grpo"]
    assert lines[2].endswith("0.863") and "reward model: held-out accuracy" in lines[2]
    assert lines[3].endswith("0.750") and "win rate vs SFT" in lines[3]
    assert len(lines) == 4
