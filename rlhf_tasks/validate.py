"""Stage ``validate``: the data-validation gate, with Great Expectations.

Bad input never reaches training. The gate loads every data set named in ``params.yaml``'s
``data`` section (or the files given on the command line) into the normalised schema of
``rlhf_tasks/data.py``, runs one Great Expectations suite per data set, and

- writes ``artifacts/validate/report.json`` (deterministic: the DVC metrics of this stage),
  Great Expectations Data Docs under ``artifacts/validate/data_docs/``, and, only when the data
  passes, the normalised data under ``artifacts/validate/data/`` (what later stages read);
- prints a summary naming each failed check with example rows (``file:line``);
- returns ``valid=False`` when a check whose severity is ``error`` fails (the CLI exits 1).

Checks, with their names in ``params.yaml`` (``validate.checks.<name>: error | warn | off``):

    parseable         every record parses (a malformed JSON line is named by its line number)
    required_columns  prompt/chosen/rejected (preferences), prompt/completion (sft), prompt
    string_types      those columns hold strings
    not_empty         no null, empty or whitespace-only text
    chosen_differs    chosen != rejected
    unique_pairs      no duplicate (prompt, chosen, rejected)
    length_chars      min_chars <= characters <= max_chars
    length_tokens     prompt + response tokens <= max_tokens (default: the model's max length)
    utf8              valid UTF-8 (undecodable bytes show up as U+FFFD)
    control_chars     no control characters other than newline and tab
    min_rows          at least min_rows parseable rows
    heldout_overlap   no training prompt is also a held-out prompt
    label_sanity      "chosen" is not the longer (or the shorter) response beyond a threshold

Great Expectations cannot tokenise or compare two data sets, so token counts, the held-out
membership and the chosen-is-longer flag are computed as helper columns (prefixed ``_``) that
standard expectations then check.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_tasks.config import Params, ValidateConfig
from rlhf_tasks.data import Dataset, load, write_jsonl
from rlhf_tasks.errors import ConfigError, DataError

DEFAULT_OUT = Path("artifacts/validate")
CONTROL_CHARS = "[\x00-\x08\x0b-\x1f\x7f-\x9f]"
PAIR_KINDS = ("preferences",)
# Rows that did not parse are reported once, by "parseable"; every other check skips them.
ONLY_PARSED = {"row_condition": "_parsed==True", "condition_parser": "pandas"}


@dataclass
class CheckResult:
    dataset: str
    check: str
    severity: str  # error | warn
    success: bool
    column: str | None = None
    unexpected: int = 0
    observed: Any = None
    detail: str = ""
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    checks: list[CheckResult]
    datasets: dict[str, dict[str, Any]]

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == "warn"]

    @property
    def valid(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "errors": len(self.failed),
            "warnings": len(self.warnings),
            "datasets": self.datasets,
            "checks": [c.__dict__ for c in self.checks],
        }


# -- helper columns -----------------------------------------------------------------------------


def _responses(ds: Dataset) -> tuple[str, ...]:
    return tuple(c for c in ds.text_columns if c != "prompt")


def _add_helper_columns(
    ds: Dataset, frame: pd.DataFrame, tokenizer: Any, heldout_prompts: set[str] | None
) -> pd.DataFrame:
    frame = frame.copy()
    cols = set(frame.columns)
    if tokenizer is not None and "prompt" in cols:
        # Tokens of prompt + response, as the trainers will see them (special tokens included).
        prompts = frame["prompt"].tolist()
        for response in [c for c in _responses(ds) if c in cols] or [None]:
            replies = frame[response].tolist() if response else [""] * len(frame)
            rows = [
                i
                for i, (p, r) in enumerate(zip(prompts, replies, strict=True))
                if isinstance(p, str) and isinstance(r, str)
            ]
            texts = [f"{prompts[i]} {replies[i]}".rstrip() for i in rows]
            counts: list[int | None] = [None] * len(frame)
            if texts:
                ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
                for i, tokens in zip(rows, ids, strict=True):
                    counts[i] = len(tokens)
            frame[f"_tokens_{response or 'prompt'}"] = pd.Series(
                counts, index=frame.index, dtype=object
            )
    if heldout_prompts is not None and "prompt" in cols:
        frame["_heldout_prompt"] = [
            isinstance(p, str) and p.strip() in heldout_prompts for p in frame["prompt"]
        ]
    if ds.kind in PAIR_KINDS and {"chosen", "rejected"} <= cols:
        # 1.0 chosen longer, 0.0 shorter; pairs of equal length say nothing about the rule.
        frame["_chosen_longer"] = [
            float(len(c) > len(r))
            if isinstance(c, str) and isinstance(r, str) and len(c) != len(r)
            else None
            for c, r in zip(frame["chosen"], frame["rejected"], strict=True)
        ]
    return frame


# -- the suite ----------------------------------------------------------------------------------


def _expectations(
    ds: Dataset, frame: pd.DataFrame, cfg: ValidateConfig, max_tokens: int | None
) -> list[tuple[str, str | None, Any]]:
    """(check name, column, expectation) for one data set, skipping checks set to ``off``."""
    import great_expectations as gx

    E = gx.expectations
    sev = cfg.checks.model_dump()
    out: list[tuple[str, str | None, Any]] = []

    def add(check: str, column: str | None, expectation: Any) -> None:
        if sev[check] != "off":
            out.append((check, column, expectation))

    present = [c for c in ds.text_columns if c in frame.columns]
    for col in ds.text_columns:
        add("required_columns", col, E.ExpectColumnToExist(column=col))
    for col in present:
        add(
            "string_types",
            col,
            E.ExpectColumnValuesToBeInTypeList(**ONLY_PARSED, column=col, type_list=["str"]),
        )
        add("not_empty", col, E.ExpectColumnValuesToNotBeNull(**ONLY_PARSED, column=col))
        add(
            "not_empty",
            col,
            E.ExpectColumnValuesToNotMatchRegex(**ONLY_PARSED, column=col, regex=r"^\s*$"),
        )
        add(
            "length_chars",
            col,
            E.ExpectColumnValueLengthsToBeBetween(
                **ONLY_PARSED, column=col, min_value=cfg.min_chars, max_value=cfg.max_chars
            ),
        )
        add(
            "utf8",
            col,
            E.ExpectColumnValuesToNotMatchRegex(**ONLY_PARSED, column=col, regex="\ufffd"),
        )
        add(
            "control_chars",
            col,
            E.ExpectColumnValuesToNotMatchRegex(**ONLY_PARSED, column=col, regex=CONTROL_CHARS),
        )
    for col in [c for c in frame.columns if c.startswith("_tokens_")]:
        add(
            "length_tokens",
            col,
            E.ExpectColumnValuesToBeBetween(
                **ONLY_PARSED, column=col, min_value=1, max_value=max_tokens
            ),
        )
    add("min_rows", None, E.ExpectTableRowCountToBeBetween(**ONLY_PARSED, min_value=cfg.min_rows))
    if "_heldout_prompt" in frame.columns:
        add(
            "heldout_overlap",
            "prompt",
            E.ExpectColumnValuesToBeInSet(
                **ONLY_PARSED, column="_heldout_prompt", value_set=[False]
            ),
        )
    if ds.kind in PAIR_KINDS and {"chosen", "rejected"} <= set(frame.columns):
        add(
            "chosen_differs",
            "chosen",
            E.ExpectSelectColumnValuesToBeUniqueWithinRecord(
                **ONLY_PARSED, column_list=["chosen", "rejected"]
            ),
        )
        if "prompt" in frame.columns:
            add(
                "unique_pairs",
                None,
                E.ExpectCompoundColumnsToBeUnique(
                    **ONLY_PARSED, column_list=["prompt", "chosen", "rejected"]
                ),
            )
        # Judged on pairs of unequal length, and only on enough of them to mean something.
        if frame["_chosen_longer"].notna().sum() >= cfg.label_sanity_min_pairs:
            thr = cfg.label_sanity_threshold
            add(
                "label_sanity",
                "_chosen_longer",
                E.ExpectColumnMeanToBeBetween(
                    **ONLY_PARSED,
                    column="_chosen_longer",
                    min_value=round(1 - thr, 6),
                    max_value=thr,
                ),
            )
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(check: str, column: str | None, result: dict, cfg: ValidateConfig) -> str:
    count = result.get("unexpected_count", 0)
    observed = result.get("observed_value")
    if check == "min_rows":
        return f"{observed} rows, need at least {cfg.min_rows}"
    if check == "required_columns":
        return f"column {column!r} is missing"
    if check == "label_sanity":
        share, limit = 100 * float(observed or 0), 100 * cfg.label_sanity_threshold
        return (
            f"chosen is the longer response in {share:.1f}% of pairs (allowed: {100 - limit:.0f}%"
            f" to {limit:.0f}%)"
        )
    what = {
        "parseable": "rows that do not parse",
        "string_types": f"rows where {column!r} is not a string",
        "not_empty": f"rows where {column!r} is null, empty or whitespace",
        "length_chars": f"rows where {column!r} has fewer than {cfg.min_chars} or more than "
        f"{cfg.max_chars} characters",
        "length_tokens": f"rows where prompt + {column.removeprefix('_tokens_') if column else ''} "
        "exceeds the token limit",
        "utf8": f"rows where {column!r} is not valid UTF-8",
        "control_chars": f"rows where {column!r} holds control characters",
        "heldout_overlap": "rows whose prompt is also a held-out prompt",
        "chosen_differs": "rows where chosen == rejected",
        "unique_pairs": "duplicate (prompt, chosen, rejected) rows",
    }.get(check, "unexpected rows")
    return f"{count} {what}"


def _examples(frame: pd.DataFrame, column: str | None, result: dict, limit: int) -> list[dict]:
    out = []
    for idx in (result.get("partial_unexpected_index_list") or [])[:limit]:
        row = frame.loc[idx]
        example = {"file": row["_file"], "line": int(row["_line"])}
        if row.get("_parse_error"):
            example["error"] = row["_parse_error"]
        elif column and column in frame.columns:
            example["value"] = _short(row[column])
        out.append(example)
    return out


def _context(docs_dir: Path | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="rlhf",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def run_checks(
    datasets: dict[str, Dataset],
    cfg: ValidateConfig,
    tokenizer: Any = None,
    max_tokens: int | None = None,
    heldout_prompts: set[str] | None = None,
    train_sets: frozenset[str] | set[str] = frozenset(),
    docs_dir: Path | None = None,
) -> Report:
    """Validate each data set with its own expectation suite; build Data Docs into ``docs_dir``.

    ``heldout_prompts`` are checked against the data sets named in ``train_sets``.
    """
    import great_expectations as gx

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("rlhf")
    severity = cfg.checks.model_dump()
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.max_examples}
    checks: list[CheckResult] = []
    summaries: dict[str, dict[str, Any]] = {}
    for name, ds in datasets.items():
        overlap = heldout_prompts if name in train_sets else None
        frame = _add_helper_columns(ds, ds.frame, tokenizer, overlap)
        frame["_parsed"] = frame["_parse_error"].isna()
        plan = _expectations(ds, frame, cfg, max_tokens)
        if severity["parseable"] != "off":
            plan.insert(
                0,
                (
                    "parseable",
                    None,
                    gx.expectations.ExpectColumnValuesToBeNull(column="_parse_error"),
                ),
            )
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        ids = [suite.add_expectation(expectation).id for _, _, expectation in plan]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        run = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        # Results come back in suite order; match them to the plan by expectation id.
        by_id = {r.expectation_config.id: r for r in run.results}
        for (check, column, _), expectation_id in zip(plan, ids, strict=True):
            res = by_id[expectation_id]
            result = dict(res.result or {})
            raised = (res.exception_info or {}).get("raised_exception")
            item = CheckResult(
                dataset=name,
                check=check,
                severity=severity[check],
                success=bool(res.success),
                column=column,
                unexpected=int(result.get("unexpected_count") or 0),
                observed=_plain(result.get("observed_value")),
            )
            if raised:
                item.detail = f"could not run: {res.exception_info.get('exception_message')}"
            elif not item.success:
                item.detail = _describe(check, column, result, cfg)
                item.examples = _examples(frame, column, result, cfg.max_examples)
            checks.append(item)
        parsed = frame[frame["_parsed"]]
        summaries[name] = {
            "kind": ds.kind,
            "files": [str(f) for f in ds.files],
            "rows": len(frame),
            "formats": sorted({f for f in parsed["_format"] if f}),
        }
        if "_chosen_longer" in frame.columns:
            share = parsed["_chosen_longer"].dropna().astype(float).mean()
            summaries[name]["chosen_longer_share"] = (
                round(float(share), 4) if share == share else None
            )
    if docs_dir is not None:
        context.build_data_docs()
    return Report(checks=checks, datasets=summaries)


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers, so that the report is plain JSON."""
    return value.item() if hasattr(value, "item") else value


# -- the stage ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A data set to validate: where it is, what kind it is, and whether it is held out."""

    paths: tuple[str, ...]
    kind: str | None  # None: detected from the first record
    heldout: bool = False


def default_sources(params: Params) -> dict[str, Source]:
    """The data sets named in params.yaml's ``data`` section."""
    d = params.data
    return {
        "preferences_train": Source((d.preferences_train,), "preferences"),
        "preferences_heldout": Source((d.preferences_heldout,), "preferences", heldout=True),
        "sft_train": Source((d.sft_train,), "sft"),
        "prompts_rl": Source((d.prompts_rl,), "prompts"),
        "prompts_heldout": Source((d.prompts_heldout,), "prompts", heldout=True),
    }


def load_tokenizer(params: Params) -> tuple[Any, int]:
    """The base model's tokenizer and its max length, for the length_tokens check."""
    from transformers import AutoTokenizer

    location = params.model.name_or_path
    cfg = params.validate_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=params.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        hint = (
            "build it first with `rlhf stage base_model` (or `dvc repro base_model`)"
            if location == "artifacts/base_model"
            else "check model.name_or_path (offline runs need the model in the local HF cache)"
        )
        raise ConfigError(
            f"validate.checks.length_tokens needs the tokenizer of model.name_or_path="
            f"{location!r}, "
            f"which could not be loaded ({str(exc).splitlines()[0]}); {hint}, or set "
            "-S validate.checks.length_tokens=off"
        ) from None
    max_tokens = cfg.max_tokens or tokenizer.model_max_length
    if max_tokens is None or max_tokens > 10**8:  # transformers' "no limit" sentinel
        raise ConfigError(
            f"the tokenizer at {location!r} declares no model_max_length; set validate.max_tokens"
        )
    return tokenizer, int(max_tokens)


def validate(
    params: Params,
    paths: list[str] | None = None,
    heldout: list[str] | None = None,
    out_dir: Path = DEFAULT_OUT,
) -> tuple[Report, dict[str, Any]]:
    """Run the gate. With ``paths``, validate those files as one data set (``heldout`` for the
    overlap check); otherwise the data sets of ``params.yaml``. Returns the report and the
    stage result: output locations and metrics.
    """
    cfg = params.validate_config
    if paths:
        sources = {"input": Source(tuple(paths), None)}
        # One data set per held-out file: they may be of different kinds (pairs, prompts).
        for i, path in enumerate(heldout or []):
            sources["heldout" if i == 0 else f"heldout_{i + 1}"] = Source((path,), None, True)
    else:
        sources = default_sources(params)
    datasets = {name: load(src.paths, kind=src.kind) for name, src in sources.items()}
    tokenizer, max_tokens = (None, None)
    if cfg.checks.length_tokens != "off":
        tokenizer, max_tokens = load_tokenizer(params)
    heldout_prompts = {
        p.strip()
        for name, src in sources.items()
        if src.heldout
        for p in datasets[name].frame.get("prompt", pd.Series(dtype=object))
        if isinstance(p, str)
    }
    train_sets = {name for name, src in sources.items() if not src.heldout}
    docs_dir = out_dir / "data_docs"
    shutil.rmtree(docs_dir, ignore_errors=True)
    report = run_checks(
        datasets, cfg, tokenizer, max_tokens, heldout_prompts, train_sets, docs_dir=docs_dir
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    data_dir = out_dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    outputs = {"report": str(report_path), "data_docs": str(docs_dir / "index.html")}
    if report.valid:
        for name, ds in datasets.items():
            write_jsonl(ds.frame, data_dir / f"{name}.jsonl")
        outputs["data"] = str(data_dir)
    metrics = {
        "validate/valid": float(report.valid),
        "validate/errors": float(len(report.failed)),
        "validate/warnings": float(len(report.warnings)),
        **{f"validate/{name}/rows": float(s["rows"]) for name, s in report.datasets.items()},
    }
    return report, {"outputs": outputs, "metrics": metrics}


def summary(report: Report, outputs: dict[str, str]) -> str:
    """The gate's verdict for people: each failed check and warning, with example rows."""
    verdict = "PASSED" if report.valid else "FAILED"
    lines = [
        f"Validation gate {verdict}: {len(report.failed)} failed, {len(report.warnings)} "
        f"warning(s), {len(report.checks)} checks on {len(report.datasets)} data set(s)"
    ]
    for name, info in report.datasets.items():
        mine = [c for c in report.checks if c.dataset == name]
        bad = [c for c in mine if not c.success]
        status = "ok" if not bad else f"{len(bad)} problem(s)"
        lines.append(f"  {name}: {info['rows']} rows from {', '.join(info['files'])}: {status}")
        for c in bad:
            tag = "FAIL" if c.severity == "error" else "WARN"
            lines.append(f"    {tag} {c.check}: {c.detail}")
            for ex in c.examples:
                what = ex.get("error") or (f"{c.column}={ex['value']}" if "value" in ex else "")
                lines.append(f"         {ex['file']}:{ex['line']}  {what}")
    lines.append(f"  report: {outputs['report']}   Data Docs: {outputs['data_docs']}")
    return "\n".join(lines)


class ValidationFailed(DataError):
    """The gate stopped the run: at least one check with severity ``error`` failed."""


def run(params: Params, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    """The ``validate`` stage: run the gate on params.yaml's data, print the summary, and raise
    ValidationFailed (after writing the report) when the data must not reach training."""
    report, result = validate(params, out_dir=out_dir)
    print(summary(report, result["outputs"]))
    if not report.valid:
        failed = ", ".join(sorted({f"{c.dataset}/{c.check}" for c in report.failed}))
        raise ValidationFailed(
            f"validation gate failed ({failed}); nothing downstream ran. "
            f"Details: {result['outputs']['report']}"
        )
    return result
