"""Markdown artifacts the flow leaves in Prefect: the validation report when the gate fails, and
the evaluation report (key metrics, champion vs challenger, sample generations, MLflow runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact

from rlhf_tasks.metrics import KEY_METRICS
from rlhf_tasks.stages import STAGES
from rlhf_tasks.tracking import runs, store

SAMPLES = 5  # generations shown side by side


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def validation_artifact(report_path: Path) -> None:
    """The failed checks of the gate, with example rows (file and line)."""
    if not report_path.exists():
        return
    report = json.loads(report_path.read_text())
    lines = ["# Validation gate FAILED", "", "| data set | check | detail | examples |"]
    lines.append("|---|---|---|---|")
    for check in report.get("checks", []):
        if check.get("success") or check.get("severity") != "error":
            continue
        examples = "; ".join(
            f"{ex.get('file')}:{ex.get('line')} {ex.get('error') or ex.get('value', '')}"
            for ex in check.get("examples", [])
        )
        lines.append(
            f"| {check['dataset']} | {check['check']} | {_cell(check.get('detail', ''))} | "
            f"{_cell(examples)} |"
        )
    lines += ["", f"Full report: `{report_path.resolve()}`"]
    create_markdown_artifact("\n".join(lines), key="validation-report")


def _run_link(run_id: str) -> str:
    uri = store.tracking_uri()
    if uri.startswith("http"):
        import mlflow

        experiment = mlflow.get_run(run_id).info.experiment_id
        link = f"{store.redact_url(uri)}/#/experiments/{experiment}/runs/{run_id}"
        return f"[{run_id[:8]}]({link})"
    return f"`{run_id}` ({store.redact_url(uri)})"


def evaluation_artifact(results: dict[str, Any], parent_run_id: str) -> None:
    """Key metrics, the promotion decision, sample generations and the MLflow runs."""
    metrics: dict[str, Any] = {}
    for stage in {stage for stage, _, _ in KEY_METRICS}:
        metrics[stage] = results.get(stage, {}).get("metrics", {})
    lines = ["# RLHF pipeline: evaluation", "", "| metric | value |", "|---|---|"]
    for stage, key, label in KEY_METRICS:
        if key in metrics[stage]:
            lines.append(f"| {label.strip()} | {metrics[stage][key]:.3f} |")
    decision_path = STAGES["promote"].workdir / "decision.json"
    if decision_path.exists():
        d = json.loads(decision_path.read_text())
        verdict = "**champion**" if d["promoted"] else "**rejected**"
        if not d.get("new_version", True):
            verdict += " (no new version: the training stages were cached)"
        lines += [
            "",
            "## Champion vs challenger",
            "",
            f"{d['model']} version {d['version']} (challenger): {verdict}; judge's win rate "
            f"{d['win_rate']:.3f} against {d['baseline']}.",
        ]
        lines += [f"- {reason}" for reason in d["reasons"]]
    generations = Path(STAGES["evaluate"].outputs["generations"].path)
    if generations.exists():
        with generations.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for _, line in zip(range(SAMPLES), fh, strict=False)]
        lines += ["", "## Sample generations (judge score)", "", "| prompt | SFT | policy |"]
        lines.append("|---|---|---|")
        for row in rows:
            lines.append(
                f"| {_cell(row['prompt'])} | {_cell(row['sft'])} ({row['sft_judge_score']:.2f}) "
                f"| {_cell(row['policy'])} ({row['policy_judge_score']:.2f}) |"
            )
    lines += ["", "## MLflow runs", "", f"- pipeline: {_run_link(parent_run_id)}"]
    for stage in results:
        record = runs.recorded_run(stage)
        if record:
            lines.append(f"- {stage}: {_run_link(record['run_id'])}")
    create_markdown_artifact("\n".join(lines), key="evaluation-report")
