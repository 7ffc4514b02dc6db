"""``rlhf init``: a params file for a user's own model and data.

    rlhf init --model DIR_OR_HUB_ID --data PATH [PATH ...] [--out params.yaml] [--force]

It reads the model (its architecture, size, maximum length, checkpoint dtype and chat template)
and the data (each path's kind and format, detected per record as the pipeline reads it; its
rows' token lengths as the chat template renders them), and writes the project's params with:

- ``model.name_or_path``; ``data.*`` pointing at the paths by kind (preference pairs: a training
  and a held-out set, two paths or a DatasetDict with a test split; SFT demonstrations; prompts,
  by default the prompts of the preference pairs); ``data.format`` when every set has one format;
- lengths that fit the data: each stage's ``max_length`` (and PPO's prompt and response lengths)
  the smallest multiple of 64 tokens that keeps at least 98% of its rows, within the model's
  maximum length, with the share each keeps;
- learning rates for a pretrained model (the demo's are for a random-init one), LoRA on above
  about 1B parameters, bf16 mixed precision when a GPU has it (the weights train in fp32);
- the judge: ``evaluate.judge: heldout_rm`` with ``judge.fraction: 0.2`` (the demo's gold judge
  knows only the demo's prompts); a reward-model accuracy floor for real preference data.

Everything else is the repository's ``params.yaml`` as it is: its comments say what each key
does. A model whose tokenizer has no chat template is refused (every stage renders chats).
"""

from __future__ import annotations

import datetime
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_tasks.config import DEFAULT_PARAMS, ModelConfig, load_params, set_key
from rlhf_tasks.errors import ConfigError
from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.models import check_model_location, load_tokenizer

# The repository's own params.yaml: what `rlhf init` starts from.
TEMPLATE = Path(__file__).resolve().parent.parent / "params.yaml"
KEEP = 0.98  # share of each data set's rows a chosen length keeps (within max_dropped_fraction)
STEP = 64  # lengths are multiples of this many tokens
LORA_ABOVE = 1_000_000_000  # parameters
JUDGE_FRACTION = 0.2
MIN_REWARD_ACCURACY = 0.6  # real preference data: reward models reach about 0.65-0.75


@dataclass
class DataSet:
    path: str
    kind: str
    rows: int
    formats: list[str]
    heldout: bool = False  # a DatasetDict's held-out split
    frame: Any = field(default=None, repr=False)  # its records, read once


@dataclass
class Plan:
    """What ``rlhf init`` found and decided: the params to write and the lines that say why."""

    changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any) -> None:
        self.changes[key] = value


def _model_facts(location: str) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "architecture": (config.architectures or [config.model_type])[0],
        "max_length": int(max_len),
        "dtype": str(dtype).removeprefix("torch.") if dtype else "float32",
        "parameters": _parameters(Path(location)),
    }


def _parameters(path: Path) -> int | None:
    """Parameters in the checkpoint's safetensors files (their headers only); None if unknown."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(fh.get_slice(name).get_shape())
    return total


def _read(paths: list[str]) -> list[DataSet]:
    from rlhf_tasks import data

    found = []
    for path in paths:
        splits = [False]
        if Path(path, "dataset_dict.json").is_file():
            splits = [False, True]
        for heldout in splits:
            ds = data.load([path], heldout=heldout)
            bad = ds.frame["_parse_error"].notna()
            if bad.any():
                row = ds.frame[bad].iloc[0]
                raise ConfigError(
                    f"{row['_file']}:{row['_line']}: {row['_parse_error']} "
                    f"({int(bad.sum())} of {len(ds.frame)} records cannot be read); fix the "
                    "data, or see `rlhf validate PATH`"
                )
            formats = sorted(set(ds.frame["_format"].dropna()))
            found.append(DataSet(path, ds.kind, len(ds.frame), formats, heldout, ds.frame))
    return found


def _assign(sets: list[DataSet]) -> dict[str, DataSet]:
    """Each data role (data.preferences_train, ...) and the data set that fills it."""
    by_kind: dict[str, list[DataSet]] = {}
    for ds in sets:
        by_kind.setdefault(ds.kind, []).append(ds)
    prefs = by_kind.get("preferences", [])
    heldout = [d for d in prefs if d.heldout or _looks_heldout(d.path)]
    train = [d for d in prefs if d not in heldout]
    if len(train) != 1 or len(heldout) != 1:
        listed = ", ".join(f"{d.path} ({d.kind}, {d.rows} rows)" for d in sets)
        raise ConfigError(
            "rlhf init needs one training and one held-out set of preference pairs: two paths "
            "(the held-out one named test, heldout, eval or valid…) or a Hugging Face "
            f"DatasetDict with a test split; got {listed}"
        )
    sft = by_kind.get("sft", [])
    if len(sft) != 1:
        raise ConfigError(
            "rlhf init needs one set of SFT demonstrations (messages, prompt + completion, "
            f"ShareGPT or Alpaca records) for the sft stage; got {len(sft)}: "
            + (", ".join(d.path for d in sft) or "none")
        )
    prompts = by_kind.get("prompts", [])
    roles = {"preferences_train": train[0], "preferences_heldout": heldout[0], "sft_train": sft[0]}
    rl = [d for d in prompts if not _looks_heldout(d.path)]
    held = [d for d in prompts if _looks_heldout(d.path)]
    roles["prompts_rl"] = rl[0] if rl else train[0]
    roles["prompts_heldout"] = held[0] if held else heldout[0]
    return roles


def _count(n: int | None) -> str:
    if not n:
        return "an unknown number of"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _common_dir(paths: list[str]) -> str | None:
    """The directory inside the project that holds every data path (None: none does)."""
    if any(Path(p).is_absolute() or ".." in Path(p).parts for p in paths):
        return None
    parent = Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    return str(parent) if parent != Path() else None


def _looks_heldout(path: str) -> bool:
    return bool(re.search(r"(test|held.?out|eval|valid|dev)", Path(path).name, re.IGNORECASE))


def _fit(lengths: list[int], ceiling: int) -> tuple[int, float]:
    """The smallest multiple of STEP tokens (at most ``ceiling``) that keeps KEEP of
    ``lengths``, and the share it keeps."""
    ordered = sorted(lengths)
    wanted = ordered[min(len(ordered) - 1, math.ceil(KEEP * len(ordered)) - 1)]
    limit = min(ceiling, max(STEP, math.ceil(wanted / STEP) * STEP))
    return limit, sum(n <= limit for n in ordered) / len(ordered)


def _lengths(tokenizer: Any, roles: dict[str, DataSet]) -> dict[str, list[int]]:
    """Token lengths as the stages render them: SFT conversations, the longer of each pair,
    prompts with the generation prompt, and responses (chosen) on their own."""

    def tokens(chats: list[list[dict[str, str]]], generation: bool = False) -> list[int]:
        return [
            len(
                tokenizer.apply_chat_template(
                    c, tokenize=True, return_dict=True, add_generation_prompt=generation
                )["input_ids"]
            )
            for c in chats
        ]

    # The records _read kept (prompts_rl may be the preference pairs: their prompt column).
    sft, pairs, prompts = (roles[r].frame for r in ("sft_train", "preferences_train", "prompts_rl"))

    def chats(frame: Any, responses: str) -> list[list[dict[str, str]]]:
        return [
            [*prompt_messages(p), {"role": "assistant", "content": r}]
            for p, r in zip(frame.prompt, frame[responses], strict=True)
        ]

    chosen = tokens(chats(pairs, "chosen"))
    rejected = tokens(chats(pairs, "rejected"))
    prompt_only = tokens([prompt_messages(p) for p in pairs.prompt], generation=True)
    return {
        "sft": tokens(chats(sft, "completion")),
        "pairs": [max(c, r) for c, r in zip(chosen, rejected, strict=True)],
        "prompts": tokens([prompt_messages(p) for p in prompts.prompt], generation=True),
        "responses": [max(1, c - p) for c, p in zip(chosen, prompt_only, strict=True)],
    }


def plan(model: str, paths: list[str]) -> Plan:
    """What to write for ``model`` and the data at ``paths`` (see the module docstring)."""
    from rlhf_tasks.preflight import no_chat_template

    check_model_location(model, "--model", ModelConfig())
    tokenizer = load_tokenizer(model, False, "--model")
    if not getattr(tokenizer, "chat_template", None):
        raise no_chat_template(model, "--model")
    facts = _model_facts(model)
    sets = _read(paths)
    roles = _assign(sets)
    out = Plan()
    size = facts["parameters"]
    out.notes.append(
        f"model: {model} ({facts['architecture']}, {_count(size)} parameters, "
        f"{facts['dtype']} checkpoint: trains in fp32 master weights), max length "
        f"{facts['max_length']} tokens, chat template"
    )
    out.set("model.name_or_path", model)
    for role, ds in roles.items():
        out.set(f"data.{role}", ds.path)
        split = " (its held-out split)" if ds.heldout else ""
        what = f"{ds.kind}, {ds.rows} rows"
        if role.startswith("prompts") and ds.kind == "preferences":
            what = f"the prompts of its {ds.rows} pairs"
        out.notes.append(
            f"data.{role}: {ds.path}{split}: {what}, format {', '.join(ds.formats) or 'unknown'}"
        )
    parent = _common_dir([ds.path for ds in roles.values()])
    if parent:
        out.set("data.dir", parent)
        out.notes.append(f"data.dir: {parent} (version it with `dvc add {parent}`)")
    formats = {f for ds in roles.values() for f in ds.formats}
    if len(formats) == 1 and formats <= {"sharegpt", "alpaca", "ultrafeedback"}:
        out.set("data.format", formats.pop())
    smallest = min(ds.rows for ds in roles.values())
    if smallest < 100:
        out.set("validate.min_rows", smallest)
        out.notes.append(
            f"validate.min_rows: {smallest} (the smallest data set; the demo's is 100)"
        )

    ceiling = facts["max_length"]
    lengths = _lengths(tokenizer, roles)
    sft_len, sft_kept = _fit(lengths["sft"], ceiling)
    pair_len, pair_kept = _fit(lengths["pairs"], ceiling)
    response, _ = _fit(lengths["responses"], min(512, ceiling // 2))
    prompt_len, prompt_kept = _fit(lengths["prompts"], max(STEP, ceiling - response))
    out.set("sft.args.max_length", sft_len)
    out.set("reward.args.max_length", pair_len)
    out.set("dpo.args.max_length", pair_len)
    out.set("ppo.response_length", response)
    out.set("ppo.max_prompt_length", prompt_len)
    out.set("evaluate.max_new_tokens", response)
    for what, limit, kept, n in (
        ("sft.args.max_length", sft_len, sft_kept, len(lengths["sft"])),
        ("reward.args.max_length", pair_len, pair_kept, len(lengths["pairs"])),
        ("ppo.max_prompt_length", prompt_len, prompt_kept, len(lengths["prompts"])),
    ):
        warn = "" if kept >= 0.95 else " (under 95%: the stage will refuse; shorten the data)"
        out.notes.append(f"{what}: {limit} tokens keeps {kept:.1%} of {n} rows{warn}")
    out.notes.append(f"ppo.response_length: {response} tokens (most chosen answers fit)")

    lora = bool(size and size > LORA_ABOVE)
    for section in ("sft", "reward", "ppo"):
        out.set(f"{section}.lora.enabled", lora)
    out.set("sft.args.num_train_epochs", 2)
    out.set("sft.args.learning_rate", 2e-4 if lora else 2e-5)
    out.set("reward.args.num_train_epochs", 1)
    out.set("reward.args.learning_rate", 1e-4 if lora else 1e-5)
    out.set("ppo.learning_rate", 1e-5 if lora else 1e-6)
    out.set("ppo.value_learning_rate", 1e-5)
    batch = 64
    rl_rows = roles["prompts_rl"].rows
    out.set("ppo.total_episodes", max(batch, math.ceil(rl_rows / batch) * batch))
    out.notes.append(
        f"LoRA: {'on' if lora else 'off'} ({'over' if lora else 'under'} 1B parameters); "
        "learning rates for a pretrained model; PPO answers each RL prompt about once"
    )
    bf16 = _gpu_has_bf16()
    for section in ("sft", "reward", "dpo"):
        out.set(f"{section}.args.bf16", bf16)
    out.set("ppo.mixed_precision", "bf16" if bf16 else "no")
    out.notes.append(f"bf16 mixed precision: {'on (this GPU has it)' if bf16 else 'off (no GPU)'}")

    out.set("judge.fraction", JUDGE_FRACTION)
    out.set("evaluate.judge", "heldout_rm")
    out.set("promote.min_reward_model_accuracy", MIN_REWARD_ACCURACY)
    out.notes.append(
        f"judge: heldout_rm, a reward model trained on {JUDGE_FRACTION:.0%} of the training "
        "prompts that the policy's reward model never sees"
    )
    name = re.sub(r"[^a-z0-9-]+", "-", Path(model.rstrip("/")).name.lower()).strip("-")
    out.set("tracking.model_prefix", f"rlhf-{name or 'model'}")
    return out


def _gpu_has_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def write(model: str, paths: list[str], out: Path, force: bool, argv: list[str]) -> Plan:
    """Plan, then write the params file ``out`` (refused if it exists, unless ``force``), and
    check that it loads."""
    found = plan(model, paths)
    if out.exists() and not force:
        raise ConfigError(
            f"{out} exists; pass --force to replace it (git keeps the old one), or --out another "
            "file (then pass --params FILE to every command)"
        )
    template = TEMPLATE if TEMPLATE.exists() else Path(DEFAULT_PARAMS)
    raw = yaml.safe_load(template.read_text(encoding="utf-8"))
    for key, value in found.changes.items():
        set_key(raw, key, value)
    text = yaml.safe_dump(raw, sort_keys=False, width=100)
    header = [
        f"# Written by `rlhf init {' '.join(argv)}` on {datetime.date.today()}.",
        "# What it found and chose:",
        *(f"#   {note}" for note in found.notes),
        "# Every other value is the repository's params.yaml (its comments say what each does).",
    ]
    out.write_text("\n".join(header) + "\n" + text, encoding="utf-8")
    load_params(out)  # what it wrote loads, or the error names the key
    return found
