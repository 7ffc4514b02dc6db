"""Typed configuration: ``params.yaml`` loaded into one pydantic model per stage.

Every section of ``params.yaml`` is named like the stage that reads it (``validate`` is read by
``rlhf_tasks/validate.py`` and by the ``validate`` stage in ``dvc.yaml``). Loading is strict: an
unknown key, a wrong type or an impossible value stops the program before anything runs, with a
message that names the file and the key (exit code 2 from the CLI).

Overrides use DVC's syntax, ``-S section.key=value`` (the value is parsed as YAML, so
``-S validate.min_rows=50`` is an int and ``-S validate.checks.label_sanity=off`` a string).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rlhf_tasks.errors import ConfigError
from rlhf_tasks.formats import FIELDS, FORMAT_NAMES, Reading

DEFAULT_PARAMS = Path("params.yaml")

Severity = Literal["error", "warn", "off"]


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), except that ``1e-4``, written without a dot, is a float
    as in YAML 1.2 (and as people mean it), not the string "1e-4"."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Section(BaseModel):
    # strict: "3" is not an int, 1 is not a bool; forbid: a typo'd key is an error, not a default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


NOT_ROLES = ("dir", "format", "columns")


class DataConfig(_Section):
    """Where the pipeline's data lives (files or directories of .jsonl/.json/.parquet/.csv)."""

    dir: str = "data"
    preferences_train: str = "data/preferences/train.jsonl"
    preferences_heldout: str = "data/preferences/heldout.jsonl"
    sft_train: str = "data/sft/train.jsonl"
    prompts_rl: str = "data/prompts/rl.jsonl"
    prompts_heldout: str = "data/prompts/heldout.jsonl"
    # How records are read (rlhf_tasks/formats.py): "auto" detects each record's format; or one
    # of explicit, implicit, conversational, ultrafeedback, sharegpt, alpaca for every record.
    format: str = "auto"
    # A file's own key names: {field: key}, e.g. {prompt: question, chosen: good, rejected: bad}.
    columns: dict[str, str] = Field(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMAT_NAMES:
            raise ValueError(f"unknown format {value!r}; expected one of {', '.join(FORMAT_NAMES)}")
        return value

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(FIELDS))
        if unknown:
            raise ValueError(
                f"columns maps unknown field(s) {', '.join(unknown)}; the fields are "
                f"{', '.join(FIELDS)} (each mapped to your file's key)"
            )
        return value

    def roles(self) -> dict[str, str]:
        """Each data set's name (its validated file's name) and where it is read from."""
        return {
            role: getattr(self, role) for role in type(self).model_fields if role not in NOT_ROLES
        }

    def reading(self) -> Reading:
        """How the data sets' records are read."""
        return Reading(self.format, dict(self.columns))


class DemoConfig(_Section):
    """The embedded demo task (``rlhf data demo``). Changing any of these changes the data md5."""

    seed: int = 1234
    n_sft: int = Field(2000, gt=0)
    n_pairs_train: int = Field(3000, gt=0)
    n_pairs_heldout: int = Field(400, gt=0)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)


class ModelConfig(_Section):
    """The base model every training stage starts from: a hub id or a local directory."""

    name_or_path: str = "artifacts/base_model"
    # Run the Python code a model directory ships (config.json's auto_map, *.py files). Off: such
    # a model is refused before anything runs (rlhf_tasks/preflight.py).
    trust_remote_code: bool = False
    # Load pickled weights (pytorch_model.bin, *.pt): unpickling runs code. Off: only safetensors
    # load, and a model that has only pickled weights is refused before anything runs.
    allow_pickle: bool = False


class BaseModelConfig(_Section):
    """The demo's tiny base model, built locally (tokenizer trained on the demo corpus)."""

    seed: int = 0
    vocab_size: int = Field(1024, ge=64)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_length: int = Field(128, ge=16)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> BaseModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        return self


class ValidateChecks(_Section):
    """Severity of each check: ``error`` fails the gate, ``warn`` only reports, ``off`` skips."""

    @field_validator("*", mode="before")
    @classmethod
    def _bare_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false; people mean the severity "off".
        return "off" if value is False else value

    parseable: Severity = "error"
    required_columns: Severity = "error"
    string_types: Severity = "error"
    not_empty: Severity = "error"
    chosen_differs: Severity = "error"
    unique_pairs: Severity = "error"
    length_chars: Severity = "error"
    length_tokens: Severity = "error"
    utf8: Severity = "error"
    control_chars: Severity = "error"
    min_rows: Severity = "error"
    heldout_overlap: Severity = "error"
    label_sanity: Severity = "warn"


class ValidateConfig(_Section):
    """The data-validation gate (Great Expectations)."""

    min_rows: int = Field(100, ge=1)
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(4000, ge=1)
    # Tokens of prompt + response; null means the tokenizer's model_max_length.
    max_tokens: int | None = Field(None, ge=1)
    # Warn when "chosen" is the longer (or the shorter) response in more than this share of pairs.
    label_sanity_threshold: float = Field(0.9, gt=0.5, le=1.0)
    # ...judged only with at least this many pairs of unequal length.
    label_sanity_min_pairs: int = Field(20, ge=1)
    max_examples: int = Field(5, ge=1)
    # Rows validated at a time: memory is bounded by this, not by the size of the files.
    chunk_rows: int = Field(20000, ge=100)
    checks: ValidateChecks = ValidateChecks()

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidateConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        return self


# The training stages' sections are *Section, not *Config: peft and TRL own LoraConfig,
# SFTConfig and RewardConfig, which the stages use alongside these.
class LoraSection(_Section):
    """LoRA (peft) for a training stage. With LoRA the stage merges the adapter into the base
    weights before it saves, so later stages always receive a plain model directory."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names (e.g. [q_proj, v_proj]) or "all-linear": every linear layer but the output one.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ResourcesSection(_Section):
    """How a training stage runs: ``num_processes > 1`` launches it under ``accelerate launch``
    (DDP: one process per GPU, or gloo processes on a CPU), each with its share of the data."""

    num_processes: int = Field(1, ge=1)


class SftSection(_Section):
    """Stage ``sft``: supervised fine-tuning with TRL's SFTTrainer.

    ``args`` is passed to ``trl.SFTConfig`` as it is: any of its fields (and of
    ``transformers.TrainingArguments``), checked against the dataclass when the stage starts. An
    empty mapping means TRL's defaults. The stage sets ``output_dir``, ``seed``,
    ``trust_remote_code`` (from ``model``), ``report_to`` and, without CUDA, ``use_cpu`` itself.
    """

    seed: int = 42
    # Fail before training when more than this share of the rows would be dropped or truncated
    # into the response (by max_length and the like): rlhf_tasks/rows.py.
    max_dropped_fraction: float = Field(0.05, ge=0, le=1)
    args: dict[str, Any] = {}
    lora: LoraSection = LoraSection()
    resources: ResourcesSection = ResourcesSection()


class RewardSection(_Section):
    """Stage ``reward``: a Bradley–Terry reward model with TRL's RewardTrainer.

    ``args`` is passed to ``trl.RewardConfig`` (see SftSection).
    """

    seed: int = 42
    # "sft": the sft stage's model; "base": model.name_or_path; anything else: a path or hub id.
    init_from: str = "sft"
    # Train on the annotators' margins: loss = -log sigmoid(r_chosen - r_rejected - margin).
    use_margin: bool = False
    # Batch size of the held-out scoring (pairs are scored after training, by the saved model).
    eval_batch_size: int = Field(64, ge=1)
    # Fail before training when more than this share of the rows would be dropped or truncated
    # into the response (by max_length and the like): rlhf_tasks/rows.py.
    max_dropped_fraction: float = Field(0.05, ge=0, le=1)
    args: dict[str, Any] = {}
    lora: LoraSection = LoraSection()
    resources: ResourcesSection = ResourcesSection()


class JudgeSection(_Section):
    """Stage ``judge``: a second reward model for ``evaluate.judge: heldout_rm``, trained as the
    ``reward`` stage trains (its init, args, LoRA and resources) on a share of the training
    pairs that the reward model never sees: whole prompts, chosen by a hash of their text."""

    # Share of the training prompts (with every pair of each) kept from the reward model to
    # train the judge; 0: no judge is trained (the stage only records that).
    fraction: float = Field(0.0, ge=0, le=0.5)
    seed: int = 43


Algorithm = Literal["ppo", "rloo", "grpo", "dpo"]  # each has a params section of its name
ALGORITHMS: tuple[str, ...] = Algorithm.__args__


class PolicySection(_Section):
    """Stage ``policy``: which algorithm turns the SFT model into the policy. ``ppo`` is this
    project's PPO against the reward model (section ``ppo``); ``rloo`` and ``grpo`` are TRL's
    online trainers with the same reward model as reward function; ``dpo`` is TRL's DPO on the
    preference pairs (no reward model). Each reads its own section below."""

    algorithm: Algorithm = "ppo"


class PpoSection(_Section):
    """Our PPO (``rlhf_tasks/ppo/``): per-token KL penalty to the SFT model, GAE, clipped
    policy and value losses. One *update* = a rollout of ``rollout_batch_size`` prompts, then
    ``ppo_epochs`` passes of minibatch steps over it."""

    seed: int = 0
    total_episodes: int = Field(3072, gt=0)  # prompts answered over the run
    rollout_batch_size: int = Field(64, gt=0)  # prompts per update
    mini_batch_size: int = Field(16, gt=0)
    # Episodes per forward/backward within a minibatch (gradients accumulated, weighted by
    # tokens): bounds memory for long sequences and large vocabularies; null: the minibatch.
    micro_batch_size: int | None = Field(None, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    learning_rate: float = Field(1e-4, ge=0)  # policy; linear decay to 0 over the run
    value_learning_rate: float = Field(1e-4, ge=0)
    response_length: int = Field(40, gt=0)  # max new tokens per response
    temperature: float = Field(0.7, gt=0)  # sampling; also divides the logits of every logprob
    kl_coef: float = Field(0.1, ge=0)  # beta of the per-token KL penalty (initial, if adaptive)
    target_kl: float | None = Field(None, gt=0)  # set: adapt kl_coef towards this sequence KL
    kl_horizon: int = Field(10000, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # AdamW's weight decay, on weight matrices only (never biases or norms); TRL and InstructGPT: 0.
    weight_decay: float = Field(0.0, ge=0)
    # Subtracted from the score of a response that never ends (no EOS); null: no penalty.
    missing_eos_penalty: float | None = Field(1.0, ge=0)
    # Prompts longer than this many tokens (chat template applied) are dropped, or cut to their
    # last max_prompt_length tokens with truncate_prompts: left; null: the model's max length
    # less response_length. More than max_dropped_fraction of them fails the stage before
    # training.
    max_prompt_length: int | None = Field(None, gt=0)
    truncate_prompts: Literal["no", "left"] = "no"
    max_dropped_fraction: float = Field(0.05, ge=0, le=1)
    save_every: int = Field(8, gt=0)  # updates between checkpoints
    keep_checkpoints: int = Field(2, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # With LoRA the reference model is the policy with its adapter disabled (no second copy).
    lora: LoraSection = LoraSection()
    resources: ResourcesSection = ResourcesSection()

    @model_validator(mode="after")
    def _batches_divide(self) -> PpoSection:
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) exceeds rollout_batch_size "
                f"({self.rollout_batch_size})"
            )
        # Both sizes count episodes over all processes; each process takes an equal share (a
        # remainder would be prompts silently left out, or uneven steps).
        processes = self.resources.num_processes
        for name in ("rollout_batch_size", "mini_batch_size"):
            if getattr(self, name) % processes:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) is not divisible by "
                    f"resources.num_processes ({processes}): each process takes an equal share"
                )
        if self.mixed_precision == "fp16":
            raise ValueError(
                "mixed_precision fp16 is not supported: the policy and value optimisers would "
                "share one loss scaler, unscaled twice per step; use bf16 (a GPU with bf16 "
                "support) or no"
            )
        return self


class TrlPolicySection(_Section):
    """A TRL trainer for the policy stage (``rloo``, ``grpo``, ``dpo``): ``args`` go to its
    config class (``trl.RLOOConfig``, ...) as they are, checked like ``sft.args``."""

    seed: int = 42
    # Fail before training when more than this share of the rows would be dropped or truncated
    # into the response (by max_length and the like): rlhf_tasks/rows.py.
    max_dropped_fraction: float = Field(0.05, ge=0, le=1)
    args: dict[str, Any] = {}
    lora: LoraSection = LoraSection()
    resources: ResourcesSection = ResourcesSection()


# evaluate.judge: the judge stage's reward model (trained on judge.fraction of the pairs).
HELDOUT_RM = "heldout_rm"


class EvaluateSection(_Section):
    """Stage ``evaluate``: the policy against the SFT model on held-out prompts."""

    # "gold": the demo's gold judge; "heldout_rm": the judge stage's reward model (trained on
    # judge.fraction of the pairs, which the reward model never saw); else the path of a reward
    # model the policy was not trained against (an external one): never the reward stage's own.
    judge: str = "gold"
    samples_per_prompt: int = Field(2, gt=0)
    max_new_tokens: int = Field(40, gt=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling (1: off)
    batch_size: int = Field(64, gt=0)
    report_examples: int = Field(12, ge=0)  # prompts shown side by side in report.md
    seed: int = 0
    # KL(policy || SFT) in nats per response that a policy may spend; reported as a check.
    kl_budget: float = Field(10.0, gt=0)


class TrackingSection(_Section):
    """MLflow: the experiment every run goes to and the registry names (not a stage; changing it
    re-runs nothing). The store is ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here."""

    experiment: str = Field("rlhf", min_length=1)
    # Models are registered as <model_prefix>-policy and <model_prefix>-reward.
    model_prefix: str = Field("rlhf-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PromoteSection(_Section):
    """Stage ``promote``: register the policy and reward model, then the gate. The new policy
    version (alias ``challenger``) gets ``champion`` only if it passes every threshold here;
    otherwise it is tagged rejected, with the reasons."""

    # Judge's win rate of the challenger against the champion on the held-out prompts (the first
    # model is compared with the SFT model). 0.5 is a tie: a retrain that is no better stays out.
    min_win_rate: float = Field(0.55, ge=0, le=1)
    # The reward model's held-out accuracy must reach this floor.
    min_reward_model_accuracy: float = Field(0.75, ge=0, le=1)
    # evaluate's checks that must pass (checks/<name> == 1); the KL budget is evaluate.kl_budget.
    required_checks: list[Literal["kl_within_budget", "no_degeneration"]] = [
        "kl_within_budget",
        "no_degeneration",
    ]


class OrchestrationSection(_Section):
    """How the Prefect flow runs the stages (not a stage; changing it re-runs nothing)."""

    # Skip a stage whose inputs are unchanged and whose outputs are still its own (cache.py).
    cache: bool = True
    # Seconds a stage may run before Prefect fails it; a stage not listed has no limit.
    timeouts: dict[str, float] = {}
    # Retries of the stages that talk to services (MLflow, DVC), with exponential backoff.
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(5.0, ge=0)  # the first delay; each next one doubles
    # Prefect global concurrency limits: training stages hold a slot of `gpu_limit`, promotion
    # the single slot of `promotion_limit` (created with these sizes if they do not exist).
    gpu_limit: str = "gpu"
    gpu_slots: int = Field(1, ge=1)
    promotion_limit: str = "promotion"
    # How long a stage waits for its slot before it fails (seconds). The limits apply against a
    # Prefect server; on the ephemeral API (one machine, `rlhf run`) they are not used.
    slot_timeout_s: float = Field(21600, gt=0)


class CollectSection(_Section):
    """``rlhf collect``: preference pairs asked of people in Label Studio (not a stage; changing it
    re-runs nothing). Prompts come from ``data.prompts_rl`` (never the held-out prompts)."""

    project: str = Field("RLHF preferences", min_length=3)  # the Label Studio project's title
    num_prompts: int = Field(50, gt=0)  # prompts per collection, not already in the project
    responses_per_prompt: int = Field(2, gt=0)  # from each model (champion, and challenger)
    pairs_per_prompt: int = Field(1, gt=0)  # tasks per prompt, of distinct responses
    # Which pairs of a prompt's answers become tasks: any (random), those the champion's reward
    # model tells apart least (uncertain) or most (extremes); with 3 or more answers per prompt.
    selection: Literal["random", "uncertain", "extremes"] = "random"
    max_new_tokens: int = Field(40, gt=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, gt=0)
    seed: int = 0
    # The margin a chosen strength becomes (RewardTrainer's margin with reward.use_margin).
    margins: dict[Literal["slight", "clear", "strong"], float] = {
        "slight": 0.0,
        "clear": 1.0,
        "strong": 2.0,
    }
    # An annotator who agrees with the majority on fewer of the tasks several people labelled
    # than this fails the pull (error) or is reported (warn); judged from `min_shared` tasks.
    min_agreement: float = Field(0.5, ge=0, le=1)  # below it: worse than a coin on A or B
    min_shared: int = Field(20, gt=0)
    agreement_check: Literal["error", "warn", "off"] = "error"


class Params(_Section):
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    model: ModelConfig = ModelConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    sft: SftSection = SftSection()
    reward: RewardSection = RewardSection()
    judge: JudgeSection = JudgeSection()
    policy: PolicySection = PolicySection()
    ppo: PpoSection = PpoSection()
    rloo: TrlPolicySection = TrlPolicySection()
    grpo: TrlPolicySection = TrlPolicySection()
    dpo: TrlPolicySection = TrlPolicySection()
    evaluate: EvaluateSection = EvaluateSection()
    promote: PromoteSection = PromoteSection()
    tracking: TrackingSection = TrackingSection()
    orchestration: OrchestrationSection = OrchestrationSection()
    collect: CollectSection = CollectSection()

    @property
    def validate_config(self) -> ValidateConfig:
        return self.validate_


def set_key(raw: dict[str, Any], key: str, value: Any, what: str | None = None) -> None:
    """Set the dotted ``key`` (``sft.args.max_length``) of a raw params dict in place, making
    the sections on the way; ``what`` names the change in the error when a part of the path is
    a value, not a section."""
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what or repr(key)}: {part!r} is not a section")
        node = child
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply DVC-style ``section.key=value`` overrides to a raw params dict (a copy)."""
    result = yaml.load(yaml.safe_dump(raw), Loader=YamlLoader) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. validate.min_rows=50")
        set_key(result, key, yaml.load(value, Loader=YamlLoader), f"override {item!r}")
    return result


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read and validate ``params.yaml``; raise ConfigError naming the file and key on a mistake."""
    path = Path(path)
    if path.exists():
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    else:
        raise ConfigError(
            f"{path}: no such file (in {Path.cwd()}). Run from the project directory or pass "
            "--params PATH; for a deployment run, -p params_path=PATH (relative to the "
            "directory `prefect deploy` ran in)."
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    overridden = {item.partition("=")[0].strip() for item in overrides or []}
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            source = "-S" if key in overridden else str(path)
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: unknown key {key!r}")
            elif err["type"] == "value_error":  # our cross-field checks name their keys
                lines.append(f"{source}: {key}: {err['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None
    escaped = [
        f"{'-S' if key in overridden else path}: {key}: {value!r} is outside the project "
        f"directory ({project}); move the data into it, or give an absolute path to read it "
        "from where it is"
        for key, value, project in _data_outside_project(params, path)
    ]
    if escaped:
        raise ConfigError("\n".join(escaped))
    return params


def _data_outside_project(params: Params, path: Path) -> list[tuple[str, str, Path]]:
    """The ``data`` paths that are relative and lead out of the project directory (the params
    file's directory), as (key, value, project directory).

    The check is on the path as written (``..`` components), not through symlinks: an absolute
    path is accepted as a deliberate choice, and so is a symlink someone placed in the project
    (DVC itself may check data out as symlinks into its cache). What it catches is a relative
    path that silently reads, or with ``rlhf data demo`` writes, files of another directory.
    """
    project = Path(os.path.abspath(path.parent))
    found = []
    locations = {"dir": params.data.dir, **params.data.roles()}
    for key, value in locations.items():
        if Path(value).is_absolute():
            continue
        target = Path(os.path.normpath(project / value))
        if target != project and project not in target.parents:
            found.append((f"data.{key}", value, project))
    return found
