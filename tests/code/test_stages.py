"""The stage registry: dvc.yaml is generated from it, code deps follow imports, no import cycles,
and params.yaml, the CLI and the metrics table agree with it."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from rlhf_tasks import stages
from rlhf_tasks.config import Params
from rlhf_tasks.stages import STAGES, code_deps, dvc_yaml, imported_modules

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_dvc_yaml_is_the_registry_s() -> None:
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "run `rlhf dvc-yaml` and commit it"


def test_a_stage_depends_on_the_code_it_imports_transitively() -> None:
    # policy imports reward (its data format) and the PPO package; evaluate scores with reward
    # and computes KL with PPO's log-probs: a change to reward.py re-runs every stage that scores.
    importers = {
        name for name, s in STAGES.items() if "rlhf_tasks/reward.py" in code_deps(s.module)
    }
    assert importers == {"reward", "judge", "policy", "evaluate", "promote"}
    assert "rlhf_tasks/ppo/maths.py" in code_deps("rlhf_tasks.evaluate")
    assert "rlhf_tasks/training.py" in code_deps("rlhf_tasks.policy")
    for stage in STAGES.values():
        deps = code_deps(stage.module)
        assert f"{stage.module.replace('.', '/')}.py" in deps
        # Editing the registry (adding a stage) is no change to a stage's own code.
        assert "rlhf_tasks/stages.py" not in deps or stage.name == "promote"
        assert not any(dep.startswith("flows/") for dep in deps)


def test_imports_inside_functions_and_relative_imports_count() -> None:
    assert "rlhf_tasks.ppo" in imported_modules("rlhf_tasks.policy")  # imported in run()
    assert {"rlhf_tasks.ppo.maths", "rlhf_tasks.ppo.trainer"} <= imported_modules("rlhf_tasks.ppo")


def _project_modules() -> list[str]:
    found = []
    for package in stages.PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found.append(name.removesuffix(".__init__"))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_in_the_project() -> None:
    graph = {module: imported_modules(module) for module in _project_modules()}
    assert graph["rlhf_tasks.cli"]  # the walk sees imports at all
    assert _cycles(graph) == []
    # The cycle finder itself finds one.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_one_import_direction_stage_modules_never_import_the_tracking_or_the_flows() -> None:
    for stage in STAGES.values():
        if stage.name == "promote":  # registers models: MLflow is its job
            continue
        for module in code_deps(stage.module):
            assert not module.startswith(("rlhf_tasks/tracking/", "flows/")), (stage.name, module)
            assert module not in ("rlhf_tasks/cli.py", "rlhf_tasks/runner.py")


def test_importing_a_module_sets_no_environment_variable() -> None:
    """Only the entry points set process defaults (rlhf_tasks/environment.py, called by the CLI
    and the flows); statements that run on import never touch os.environ."""
    for module in _project_modules():
        tree = ast.parse(stages._module_file(module).read_text())
        top_level = [
            node
            for statement in tree.body
            if not isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            for node in ast.walk(statement)
        ]
        assert "os.environ" not in {
            ast.unparse(node.value)
            for node in top_level
            if isinstance(node, ast.Attribute | ast.Subscript)
        }, module


def test_no_stage_module_imports_another_for_its_paths() -> None:
    for stage in STAGES.values():
        source = stages._module_file(stage.module).read_text()
        assert "DEFAULT_OUT" not in source
        assert '"artifacts/' not in source, f"{stage.name} writes a path of its own"


def test_registry_inputs_are_upstream_outputs_or_data() -> None:
    for stage in STAGES.values():
        for role, path in stage.inputs.items():
            made_by = [
                other.name
                for other in STAGES.values()
                for out in other.outputs.values()
                if path == out.path or Path(out.path) in Path(path).parents
            ]
            assert made_by or path == "data", (stage.name, role, path)
    assert STAGES["evaluate"].upstream() == ["validate", "sft", "reward", "judge", "policy"]
    assert STAGES["sft"].upstream() == ["base_model", "validate"]


def test_each_stage_has_its_params_section() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    fields = {f.alias or n for n, f in Params.model_fields.items()}
    assert set(raw) <= fields  # no section that the config ignores
    for name, stage in STAGES.items():
        assert name in raw, f"params.yaml has no {name!r} section"
        assert name in stage.sections
        assert set(stage.sections) <= set(raw)


def test_metrics_table_shows_the_key_figures_of_the_last_run(tmp_path: Path) -> None:
    from rlhf_tasks.metrics import metrics_table

    assert "no metrics yet" in metrics_table(tmp_path)
    artifacts = tmp_path / "artifacts"
    for stage, text in (
        ("reward", '{"reward_model/accuracy": 0.8625}'),
        ("evaluate", '{"judge/win_rate_vs_sft": 0.75}'),
    ):
        (artifacts / stage).mkdir(parents=True)
        (artifacts / stage / "metrics.json").write_text(text)
    (artifacts / "policy").mkdir()
    (artifacts / "policy/run.json").write_text('{"policy/algorithm": "grpo"}')
    lines = metrics_table(tmp_path).splitlines()
    assert lines[1].split() == ["policy", "algorithm", "grpo"]
    assert lines[2].endswith("0.863") and "reward model: held-out accuracy" in lines[2]
    assert lines[3].endswith("0.750") and "win rate vs SFT" in lines[3]
    assert len(lines) == 4
