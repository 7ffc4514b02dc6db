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

    parseable         every record parses (a malformed JSON line is named by its line number;
                      an empty, binary or UTF-16 file, broken CSV quoting, a record of another
                      kind of data are parse errors too)
    required_columns  every record has prompt/chosen/rejected (preferences),
                      prompt/completion (sft), prompt (prompts)
    string_types      those columns hold strings
    not_empty         no null, empty or whitespace-only text
    chosen_differs    chosen != rejected
    unique_pairs      no repeated (prompt, chosen, rejected); a repeat names the first
    length_chars      min_chars <= characters <= max_chars
    length_tokens     prompt + response tokens, as the chat template renders them, within the
                      limit of the stage that reads the data set (rows.token_limit: e.g.
                      reward.args.max_length for the training pairs), with at most the share
                      of rows over it that the stage may drop (its max_dropped_fraction)
    utf8              valid UTF-8 (undecodable bytes show up as U+FFFD)
    control_chars     no control characters other than newline and tab
    min_rows          at least min_rows parseable rows
    heldout_overlap   no training prompt is also a held-out prompt
    label_sanity      "chosen" is not the longer (or the shorter) response beyond a threshold

Great Expectations cannot tokenise or compare two data sets, so token counts, the held-out
membership, the earlier copy of a pair and the chosen-is-longer flag are computed as helper
columns (prefixed ``_``) that standard expectations then check.

Files are read as streams and validated in chunks of ``validate.chunk_rows`` rows, so the gate's
memory does not grow with the size of the data (``bench/validate_gate.py --gigabytes 1``
measures it): row checks run on each chunk, duplicates are found across chunks through 8-byte
hashes (``data.KeyIndex``, 16 bytes per distinct pair), and the checks of a data set as a whole
(``min_rows``, ``label_sanity``) run on its one-row summary at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf_tasks import dataversion
from rlhf_tasks.config import Params, ValidateConfig
from rlhf_tasks.data import AUTO, Dataset, KeyIndex, Reading, iter_chunks, write_jsonl
from rlhf_tasks.errors import ConfigError, DataError
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.locations import StageIO
from rlhf_tasks.rows import TokenLimit, token_limit

CONTROL_CHARS = "[\x00-\x08\x0b-\x1f\x7f-\x9f]"
PAIR_KINDS = ("preferences",)
# Rows that did not parse are reported once, by "parseable"; every other check skips them.
ONLY_PARSED = {"row_condition": "_parsed==True", "condition_parser": "pandas"}
# ...and rows that lack a required key are reported once, by "required_columns".
ONLY_COMPLETE = {"row_condition": "_complete==True", "condition_parser": "pandas"}
LINE_SPAN = 2**40  # a row's place as one integer: file number * LINE_SPAN + line


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


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer of a fast tokenizer, adding special tokens as ``tokenizer(text)``
    does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            "validate.checks.length_tokens needs a fast (Rust) tokenizer; this model has none, "
            "set -S validate.checks.length_tokens=off"
        )
    return backend


def _render(tokenizer: Any, prompts: pd.Series, responses: pd.Series | None) -> list[str]:
    """Each row as the stages give it to the tokenizer: the chat template's rendering of the
    prompt's messages and the response (or, for prompts alone, the generation prompt). A
    tokenizer without a chat template gets the plain text (the stages refuse it later)."""
    if not getattr(tokenizer, "chat_template", None):
        if responses is None:
            return [p or "" for p in prompts]
        return [f"{p or ''} {r}".strip() for p, r in zip(prompts, responses, strict=True)]
    chats = []
    for i, prompt in enumerate(prompts):
        messages = prompt_messages(prompt) if prompt is not None else []
        if responses is not None:
            messages.append({"role": "assistant", "content": responses.iloc[i]})
        chats.append(messages)
    return tokenizer.apply_chat_template(
        chats, tokenize=False, add_generation_prompt=responses is None
    )


def _add_helper_columns(
    ds: Dataset,
    tokenizer: Any,
    heldout_prompts: set[str] | None,
    seen: KeyIndex,
    file_ids: dict[str, int],
) -> pd.DataFrame:
    """The chunk's frame with the columns that the expectations check besides the data's own."""
    frame = ds.frame.copy()
    frame["_parsed"] = frame["_parse_error"].isna()
    # Rows with every required key: the per-column checks judge these (the others are reported
    # once, by "parseable" or "required_columns").
    frame["_complete"] = frame["_parsed"] & frame["_missing"].isna()
    complete = frame.index[frame["_complete"]]
    if tokenizer is not None:
        # Tokens of prompt + response as the trainers see them: rendered by the chat template
        # (its special tokens included), a multi-turn prompt as its turns.
        text = frame.loc[complete, list(ds.text_columns)]
        text = text[text.map(lambda v: isinstance(v, str) or v is None).all(axis=1)]
        for response in _responses(ds) or (None,):
            counts = pd.Series(None, index=frame.index, dtype=object)
            if len(text):
                rendered = _render(
                    tokenizer, text["prompt"], None if response is None else text[response]
                )
                # The backend tokenizer: only the lengths are needed, not Python lists of ids.
                encodings = _backend(tokenizer).encode_batch(rendered, add_special_tokens=False)
                counts.loc[text.index] = [len(e.ids) for e in encodings]
            frame[f"_tokens_{response or 'prompt'}"] = counts
    if heldout_prompts is not None:
        frame["_heldout_prompt"] = [
            isinstance(p, str) and p.strip() in heldout_prompts for p in frame["prompt"]
        ]
    if ds.kind in PAIR_KINDS:
        # 1.0 chosen longer, 0.0 shorter; pairs of equal length say nothing about the rule.
        frame["_chosen_longer"] = [
            float(len(c) > len(r))
            if isinstance(c, str) and isinstance(r, str) and len(c) != len(r)
            else None
            for c, r in zip(frame["chosen"], frame["rejected"], strict=True)
        ]
        # The file:line of an earlier row (of this chunk or an earlier one) with the same pair.
        rows = frame.loc[complete]
        earlier = seen.add(
            list(rows[list(ds.text_columns)].itertuples(index=False, name=None)),
            [
                file_ids[f] * LINE_SPAN + n
                for f, n in zip(rows["_file"], rows["_line"], strict=True)
            ],
        )
        files = {number: name for name, number in file_ids.items()}
        frame["_duplicate_of"] = pd.Series(None, index=frame.index, dtype=object)
        frame.loc[complete, "_duplicate_of"] = [
            None if e is None else f"{files[e // LINE_SPAN]}:{e % LINE_SPAN}" for e in earlier
        ]
    return frame


# -- the suite ----------------------------------------------------------------------------------


def _expectations(
    ds: Dataset, frame: pd.DataFrame, cfg: ValidateConfig, limit: TokenLimit | None
) -> list[tuple[str, str | None, Any]]:
    """(check name, column, expectation) for the rows of one data set, skipping checks set to
    ``off``; the checks of the data set as a whole are in ``_summary_expectations``."""
    import great_expectations as gx

    E = gx.expectations
    sev = cfg.checks.model_dump()
    out: list[tuple[str, str | None, Any]] = []

    def add(check: str, column: str | None, expectation: Any) -> None:
        if sev[check] != "off":
            out.append((check, column, expectation))

    add("parseable", None, E.ExpectColumnValuesToBeNull(column="_parse_error"))
    add("required_columns", None, E.ExpectColumnValuesToBeNull(**ONLY_PARSED, column="_missing"))
    for col in ds.text_columns:
        add(
            "string_types",
            col,
            E.ExpectColumnValuesToBeInTypeList(**ONLY_COMPLETE, column=col, type_list=["str"]),
        )
        add("not_empty", col, E.ExpectColumnValuesToNotBeNull(**ONLY_COMPLETE, column=col))
        add(
            "not_empty",
            col,
            E.ExpectColumnValuesToNotMatchRegex(**ONLY_COMPLETE, column=col, regex=r"^\s*$"),
        )
        add(
            "length_chars",
            col,
            E.ExpectColumnValueLengthsToBeBetween(
                **ONLY_COMPLETE, column=col, min_value=cfg.min_chars, max_value=cfg.max_chars
            ),
        )
        add(
            "utf8",
            col,
            E.ExpectColumnValuesToNotMatchRegex(**ONLY_COMPLETE, column=col, regex="\ufffd"),
        )
        add(
            "control_chars",
            col,
            E.ExpectColumnValuesToNotMatchRegex(**ONLY_COMPLETE, column=col, regex=CONTROL_CHARS),
        )
    for col in [c for c in frame.columns if c.startswith("_tokens_") and limit is not None]:
        # Fails when more rows are over the limit than the stage that reads them may lose.
        mostly = {"mostly": 1.0 - limit.allowed} if limit.allowed else {}
        add(
            "length_tokens",
            col,
            E.ExpectColumnValuesToBeBetween(
                **ONLY_COMPLETE, column=col, min_value=1, max_value=limit.tokens, **mostly
            ),
        )
    if "_heldout_prompt" in frame.columns:
        add(
            "heldout_overlap",
            "prompt",
            E.ExpectColumnValuesToBeInSet(
                **ONLY_COMPLETE, column="_heldout_prompt", value_set=[False]
            ),
        )
    if ds.kind in PAIR_KINDS:
        add(
            "chosen_differs",
            "chosen",
            E.ExpectSelectColumnValuesToBeUniqueWithinRecord(
                **ONLY_COMPLETE, column_list=["chosen", "rejected"]
            ),
        )
        add(
            "unique_pairs",
            "_duplicate_of",
            E.ExpectColumnValuesToBeNull(**ONLY_COMPLETE, column="_duplicate_of"),
        )
    return out


def _summary_expectations(
    kind: str, summary: dict[str, Any], cfg: ValidateConfig
) -> list[tuple[str, str | None, Any]]:
    """The checks of a data set as a whole, on its one-row summary (row count, shares)."""
    import great_expectations as gx

    E = gx.expectations
    sev = cfg.checks.model_dump()
    out = []
    if sev["min_rows"] != "off":
        out.append(
            (
                "min_rows",
                None,
                E.ExpectColumnValuesToBeBetween(column="rows", min_value=cfg.min_rows),
            )
        )
    # Judged on pairs of unequal length, and only on enough of them to mean something.
    if (
        kind in PAIR_KINDS
        and sev["label_sanity"] != "off"
        and summary["unequal_pairs"] >= cfg.label_sanity_min_pairs
    ):
        thr = cfg.label_sanity_threshold
        out.append(
            (
                "label_sanity",
                "_chosen_longer",
                E.ExpectColumnValuesToBeBetween(
                    column="chosen_longer_share", min_value=round(1 - thr, 6), max_value=thr
                ),
            )
        )
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_length(column: str | None, limit: TokenLimit | None) -> str:
    part = (column or "").removeprefix("_tokens_")
    what = "the prompt" if part == "prompt" else f"prompt + {part}"
    if limit is None:
        return f"rows where {what} exceeds the token limit"
    allowed = f" (allowed: {limit.allowed:.0%} of rows)" if limit.allowed else ""
    return f"rows where {what} is over {limit.setting} = {limit.tokens} tokens{allowed}"


def _describe(
    check: str,
    column: str | None,
    count: int,
    observed: Any,
    cfg: ValidateConfig,
    limit: TokenLimit | None = None,
) -> str:
    if check == "min_rows":
        return f"{observed} rows, need at least {cfg.min_rows}"
    if check == "label_sanity":
        share, limit = 100 * float(observed or 0), 100 * cfg.label_sanity_threshold
        return (
            f"chosen is the longer response in {share:.1f}% of pairs (allowed: {100 - limit:.0f}%"
            f" to {limit:.0f}%)"
        )
    what = {
        "parseable": "rows that do not parse",
        "required_columns": "rows that lack a required column",
        "string_types": f"rows where {column!r} is not a string",
        "not_empty": f"rows where {column!r} is null, empty or whitespace",
        "length_chars": f"rows where {column!r} has fewer than {cfg.min_chars} or more than "
        f"{cfg.max_chars} characters",
        "length_tokens": _describe_length(column, limit),
        "utf8": f"rows where {column!r} is not valid UTF-8",
        "control_chars": f"rows where {column!r} holds control characters",
        "heldout_overlap": "rows whose prompt is also a held-out prompt",
        "chosen_differs": "rows where chosen == rejected",
        "unique_pairs": "rows that repeat an earlier (prompt, chosen, rejected)",
    }.get(check, "unexpected rows")
    return f"{count} {what}"


def _examples(frame: pd.DataFrame, column: str | None, result: dict, limit: int) -> list[dict]:
    out = []
    for idx in (result.get("partial_unexpected_index_list") or [])[:limit]:
        row = frame.loc[idx]
        example = {"file": row["_file"], "line": int(row["_line"])}
        if row.get("_parse_error"):
            example["error"] = row["_parse_error"]
        elif row.get("_missing"):
            example["error"] = f"the record has no {row['_missing']}"
        elif column == "_duplicate_of":
            example["error"] = f"the same pair as {row['_duplicate_of']}"
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


@dataclass(frozen=True)
class Source:
    """A data set to validate: where it is, what kind it is, and whether it is held out."""

    paths: tuple[str, ...]
    kind: str | None  # None: detected from the first record
    heldout: bool = False
    reading: Reading = AUTO  # the records' format and the file's key names


def run_checks(
    sources: dict[str, Source],
    cfg: ValidateConfig,
    tokenizer: Any = None,
    limits: Callable[[str, bool], TokenLimit] | None = None,
    docs_dir: Path | None = None,
    data_dir: Path | None = None,
) -> Report:
    """Validate each data set with its own expectation suite, chunk by chunk (``cfg.chunk_rows``
    rows at a time, so memory does not grow with the files); build Data Docs into ``docs_dir``.

    Prompts of the held-out sources are checked against the others (``heldout_overlap``). With
    ``data_dir``, the normalised rows are written there as ``<name>.jsonl``, only if every check
    of severity error passed (nothing is left there otherwise).
    """
    import great_expectations as gx

    context = _context(docs_dir)
    pandas_source = context.data_sources.add_pandas("rlhf")
    severity = cfg.checks.model_dump()
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.max_examples}
    heldout_prompts = _heldout_prompts(sources, cfg.chunk_rows)
    partial = None
    if data_dir is not None:
        partial = data_dir.with_name(f".{data_dir.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)

    def validation(name: str, plan: list[tuple[str, str | None, Any]]) -> Any:
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for _, _, expectation in plan:
            suite.add_expectation(expectation)
        batch = pandas_source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        return context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )

    def merge(items: list[CheckResult], plan: list, frame: pd.DataFrame | None, run: Any) -> None:
        """Add one run's results (in the order of ``plan``) to ``items``, with example rows of
        ``frame`` (a chunk of the data) for those that failed."""
        by_id = {r.expectation_config.id: r for r in run.results}
        for item, (_, column, expectation) in zip(items, plan, strict=True):
            res = by_id[expectation.id]
            result = dict(res.result or {})
            raised = (res.exception_info or {}).get("raised_exception")
            item.unexpected += int(result.get("unexpected_count") or 0)
            if item.observed is None:
                item.observed = _plain(result.get("observed_value"))
            if raised:
                item.success = False
                item.detail = f"could not run: {res.exception_info.get('exception_message')}"
            elif not res.success:
                item.success = False
                room = cfg.max_examples - len(item.examples)
                if frame is not None and room > 0:
                    item.examples += _examples(frame, column, result, room)

    checks: list[CheckResult] = []
    summaries: dict[str, dict[str, Any]] = {}
    for name, src in sources.items():
        overlap = None if src.heldout else heldout_prompts
        seen = KeyIndex()
        counts = {"rows": 0, "parsed": 0, "chunks": 0, "longer": 0.0, "unequal_pairs": 0}
        formats: set[str] = set()
        plan: list[tuple[str, str | None, Any]] = []
        items: list[CheckResult] = []
        definition, limit = None, None
        for chunk in iter_chunks(
            src.paths, src.kind, cfg.chunk_rows, reading=src.reading, heldout=src.heldout
        ):
            file_ids = {str(f): i for i, f in enumerate(chunk.files)}
            frame = _add_helper_columns(chunk, tokenizer, overlap, seen, file_ids)
            if definition is None:  # the same columns, so the same suite, for every chunk
                limit = limits(chunk.kind, src.heldout) if limits is not None else None
                plan = _expectations(chunk, frame, cfg, limit)
                items = [CheckResult(name, c, severity[c], True, col) for c, col, _ in plan]
                definition = validation(name, plan)
                kind, files = chunk.kind, chunk.files
            run = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
            merge(items, plan, frame, run)
            parsed = frame[frame["_parsed"]]
            counts["chunks"] += 1
            counts["rows"] += len(frame)
            counts["parsed"] += len(parsed)
            formats.update(f for f in parsed["_format"] if f)
            if "_chosen_longer" in frame.columns:
                longer = parsed["_chosen_longer"].dropna().astype(float)
                counts["longer"] += float(longer.sum())
                counts["unequal_pairs"] += len(longer)
            if partial is not None:
                write_jsonl(frame[frame["_complete"]], partial / f"{name}.jsonl", append=True)
        unequal = counts["unequal_pairs"]
        summary = {
            "rows": counts["parsed"],
            "unequal_pairs": unequal,
            "chosen_longer_share": round(counts["longer"] / unequal, 4) if unequal else None,
        }
        whole = _summary_expectations(kind, summary, cfg)
        if whole:
            whole_items = [CheckResult(name, c, severity[c], True, col) for c, col, _ in whole]
            run = validation(f"{name}.summary", whole).run(
                batch_parameters={"dataframe": pd.DataFrame([summary])},
                result_format=result_format,
            )
            merge(whole_items, whole, None, run)
            for item in whole_items:
                item.observed = summary[
                    "rows" if item.check == "min_rows" else "chosen_longer_share"
                ]
                item.examples = []
            items += whole_items
        for item in items:
            if item.check == "length_tokens" and item.success and item.unexpected:
                # Within what the stage may drop: passed, but worth a warning.
                item.success, item.severity = False, "warn"
            if not item.success and not item.detail:
                item.detail = _describe(
                    item.check, item.column, item.unexpected, item.observed, cfg, limit
                )
        checks += items
        summaries[name] = {
            "kind": kind,
            "files": [str(f) for f in files],
            "rows": counts["rows"],
            "chunks": counts["chunks"],
            "formats": sorted(formats),
        }
        if kind in PAIR_KINDS:
            summaries[name]["chosen_longer_share"] = summary["chosen_longer_share"]
    if docs_dir is not None:
        context.build_data_docs()
    report = Report(checks=checks, datasets=summaries)
    if partial is not None:
        if report.valid:
            partial.mkdir(parents=True, exist_ok=True)
            partial.replace(data_dir)
        else:
            shutil.rmtree(partial, ignore_errors=True)
    return report


def _heldout_prompts(sources: dict[str, Source], chunk_rows: int) -> set[str]:
    """The prompts of the held-out sources (stripped), for the ``heldout_overlap`` check."""
    prompts: set[str] = set()
    for src in sources.values():
        if src.heldout:
            for chunk in iter_chunks(
                src.paths, src.kind, chunk_rows, reading=src.reading, heldout=True
            ):
                prompts.update(p.strip() for p in chunk.frame["prompt"] if isinstance(p, str))
    return prompts


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers, so that the report is plain JSON."""
    return value.item() if hasattr(value, "item") else value


# -- the stage ----------------------------------------------------------------------------------


def default_sources(params: Params) -> dict[str, Source]:
    """The data sets named in params.yaml's ``data`` section."""
    d, how = params.data, params.data.reading()
    return {
        "preferences_train": Source((d.preferences_train,), "preferences", False, how),
        "preferences_heldout": Source((d.preferences_heldout,), "preferences", True, how),
        "sft_train": Source((d.sft_train,), "sft", False, how),
        "prompts_rl": Source((d.prompts_rl,), "prompts", False, how),
        "prompts_heldout": Source((d.prompts_heldout,), "prompts", True, how),
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
            if Path(location).parts[:1] == ("artifacts",)  # a stage's output, not built yet
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
    *,
    out_dir: Path,
    data_docs: bool = True,
) -> tuple[Report, dict[str, Any]]:
    """Run the gate. With ``paths``, validate those files as one data set (``heldout`` for the
    overlap check); otherwise the data sets of ``params.yaml``. Writes ``report.json``, the
    validated data (``data/<name>.jsonl``) and, with ``data_docs``, Great Expectations' Data
    Docs (``data_docs/``) in ``out_dir``. Returns the report and the stage result: output
    locations and metrics.
    """
    cfg = params.validate_config
    if paths:
        how = params.data.reading()
        sources = {"input": Source(tuple(paths), None, False, how)}
        # One data set per held-out file: they may be of different kinds (pairs, prompts).
        for i, path in enumerate(heldout or []):
            sources["heldout" if i == 0 else f"heldout_{i + 1}"] = Source((path,), None, True, how)
    else:
        sources = default_sources(params)
    tokenizer, limits = None, None
    if cfg.checks.length_tokens != "off":
        tokenizer, model_max = load_tokenizer(params)

        def limits(kind: str, heldout: bool) -> TokenLimit:
            return token_limit(params, kind, heldout, model_max)

    docs_dir, data_dir = out_dir / "data_docs", out_dir / "data"
    shutil.rmtree(docs_dir, ignore_errors=True)
    report = run_checks(
        sources, cfg, tokenizer, limits, docs_dir=docs_dir if data_docs else None, data_dir=data_dir
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    outputs = {"report": str(report_path)}
    if data_docs:
        outputs["data_docs"] = str(docs_dir / "index.html")
    if report.valid:
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
        files = ", ".join(info["files"])
        lines.append(f"  {name} ({info['kind']}): {info['rows']} rows from {files}: {status}")
        for c in bad:
            tag = "FAIL" if c.severity == "error" else "WARN"
            lines.append(f"    {tag} {c.check}: {c.detail}")
            for ex in c.examples:
                what = ex.get("error") or (f"{c.column}={ex['value']}" if "value" in ex else "")
                lines.append(f"         {ex['file']}:{ex['line']}  {what}")
    docs = outputs.get("data_docs", "not built (`rlhf validate --docs` builds them)")
    lines.append(f"  report: {outputs['report']}   Data Docs: {docs}")
    return "\n".join(lines)


class ValidationFailed(DataError):
    """The gate stopped the run: at least one check with severity ``error`` failed."""


def run(params: Params, io: StageIO) -> dict[str, Any]:
    """The ``validate`` stage: run the gate on params.yaml's data, print the summary, and raise
    ValidationFailed (after writing the report) when the data must not reach training. The only
    writer of the stage's outputs: ``rlhf validate PATH`` and ``rlhf ingest`` check elsewhere.

    The version of the data it read is pinned with the validated copies (``version.json``): the
    stages after it read those copies and are tagged with that version."""
    version = dataversion.data_version(params)
    report, result = validate(params, out_dir=io.workdir)
    print(summary(report, result["outputs"]))
    if report.valid:
        try:
            dataversion.unchanged_since(version, params)
        except DataError:
            shutil.rmtree(io.outputs["data"], ignore_errors=True)  # copies of two versions
            raise
        dataversion.pin(version, io.outputs["data"])
    if not report.valid:
        failed = ", ".join(sorted({f"{c.dataset}/{c.check}" for c in report.failed}))
        lines = [f"validation gate failed ({failed}); nothing downstream ran."]
        for c in report.failed:
            first = c.examples[0] if c.examples else None
            where = f", first at {first['file']}:{first['line']}" if first else ""
            why = f" ({first['error']})" if first and "error" in first else ""
            lines.append(f"  {c.dataset}/{c.check}: {c.detail}{where}{why}")
        lines.append(f"Details: {result['outputs']['report']}")
        raise ValidationFailed("\n".join(lines))
    return result
