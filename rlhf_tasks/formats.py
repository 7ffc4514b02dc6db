"""Record formats: one record of a known public format → the pipeline's normalised fields.

Each format is detected per record (``data.format: auto``) or chosen for the whole data set
(``data.format: <name>``); ``data.columns`` renames a file's own keys to the ones below first.

========================  =================================================================
format                    keys of one record
========================  =================================================================
``explicit``              TRL's preference format: ``prompt``, ``chosen``, ``rejected`` (text)
``implicit``              Anthropic HH-RLHF: ``chosen`` and ``rejected`` each hold the whole
                          dialogue, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
``conversational``        TRL's conversational form: ``chosen`` / ``rejected`` as message lists,
                          ``prompt`` optional (text or messages); SFT ``messages`` (OpenAI) or
                          ``prompt`` + ``completion``; prompts ``prompt``
``ultrafeedback``         ``prompt`` and ``chosen`` / ``rejected`` message lists with
                          ``score_chosen`` / ``score_rejected``: their difference is the margin
``sharegpt``              ``conversations`` of ``{from, value}`` (human / gpt / system /
                          function / observation), optional ``system``; preferences add
                          ``chosen`` / ``rejected`` as one message or a list of messages
``alpaca``                ``instruction``, optional ``input``, ``system`` and ``history`` (a
                          list of ``[user, assistant]`` turns); ``output`` text is an SFT target,
                          ``output: [chosen, rejected]`` (or ``chosen`` / ``rejected``) a pair
========================  =================================================================

Message content may be a string or OpenAI's list of parts (``{"type": "text", "text": ...}``);
a part that is not text is refused, naming its type. Unpaired feedback (a completion or messages
with a ``label``, as KTO uses) is refused: it is neither a preference pair nor an SFT target.

The normalised fields are those of ``rlhf_tasks.data``: ``prompt``, ``chosen``, ``rejected``
(preferences), ``prompt``, ``completion`` (sft) or ``prompt`` (prompts), plus ``id``,
``annotator``, ``margin``. A multi-turn prompt (history, a system message) keeps its turns as a
transcript, ``System: ...\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...``, which
``prompt_messages`` turns back into messages for the chat template; a single
user turn is its text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("preferences", "sft", "prompts")
OPTIONAL_FIELDS = ("id", "annotator", "margin", "source")
# What data.columns may map a file's keys to.
FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "messages",
    "conversations",
    "system",
    "history",
    "instruction",
    "input",
    "output",
    "label",
    "score_chosen",
    "score_rejected",
    *OPTIONAL_FIELDS,
)

HH_ASSISTANT = "\n\nAssistant:"
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
# How a message's role reads in a transcript (and back, in prompt_messages).
TRANSCRIPT_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}

Message = dict[str, str]


@dataclass(frozen=True)
class Reading:
    """How records are read: their format (``auto``: detected per record, see this
    module's docstring) and the renaming of a file's keys (``{field: the file's key}``)."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)


class FormatError(ValueError):
    """A record that is not of the format it claims (or of any known one)."""


# -- messages ---------------------------------------------------------------------------------


def _text(content: Any, where: str) -> Any:
    """A message's content as text: a string, or OpenAI's list of text parts joined."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(part.get("text"))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise FormatError(
                f"{where!r} has a content part of type {kind!r}: only text parts "
                '({"type": "text", "text": ...}) can be trained on'
            )
    if not all(isinstance(t, str) for t in texts):
        raise FormatError(f"{where!r} has a text part whose 'text' is not a string")
    return "\n".join(texts)


def messages(value: Any, where: str) -> list[Message]:
    """A list of messages as ``{role, content}`` with roles user / assistant / system / tool:
    from OpenAI's ``{role, content}`` (content text or parts) or ShareGPT's ``{from, value}``."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise FormatError(f"{where!r} must be a non-empty list of messages")
    if not all(isinstance(msg, dict) for msg in value):
        raise FormatError(
            f"{where!r} is a list but not of messages ({{role, content}} or {{from, value}})"
        )
    out = []
    for i, msg in enumerate(value):
        if "role" in msg and "content" in msg:
            role, content = msg["role"], msg["content"]
        elif "from" in msg and "value" in msg:
            role, content = msg["from"], msg["value"]
        else:
            keys = ", ".join(sorted(map(str, msg))) or "none"
            raise FormatError(
                f"{where!r}[{i}] is not a message: expected {{role, content}} or {{from, value}}, "
                f"got keys {keys}"
            )
        name = ROLES.get(str(role).lower())
        if name is None:
            raise FormatError(
                f"{where!r}[{i}] has role {role!r}; known roles: {', '.join(sorted(ROLES))}"
            )
        out.append({"role": name, "content": _text(content, f"{where}[{i}].content")})
    return out


def render(turns: list[Message]) -> Any:
    """A prompt's messages as the normalised text: one user turn is its text, several turns a
    transcript (see the module's docstring)."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n\n".join(f"{TRANSCRIPT_NAMES[m['role']]}: {m['content']}" for m in turns)


_TURN = re.compile(rf"(?:^|\n\n)({'|'.join(TRANSCRIPT_NAMES.values())}): ")
_TRANSCRIPT_ROLES = {name: role for role, name in TRANSCRIPT_NAMES.items()}


def prompt_messages(prompt: str) -> list[Message]:
    """The chat messages of a normalised prompt (``render``'s inverse): one user message, or
    the turns of a transcript."""
    if not prompt.startswith(tuple(f"{TRANSCRIPT_NAMES[r]}: " for r in ("user", "system"))):
        return [{"role": "user", "content": prompt}]
    parts = _TURN.split(prompt)  # ["", "Human", "text", "Assistant", "text", ...]
    return [
        {"role": _TRANSCRIPT_ROLES[name], "content": text}
        for name, text in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _final_assistant(turns: list[Message], where: str) -> Any:
    if turns[-1]["role"] != "assistant":
        raise FormatError(f"{where!r} must end with an assistant message")
    return turns[-1]["content"]


def _prompt_turns(turns: list[Message], where: str) -> list[Message]:
    if turns[-1]["role"] not in ("user", "tool"):
        raise FormatError(f"{where!r} must end with a user message (the prompt to answer)")
    return turns


def _with_system(system: Any, turns: list[Message]) -> list[Message]:
    if system in (None, ""):
        return turns
    if not isinstance(system, str):
        raise FormatError("'system' must be text")
    return [{"role": "system", "content": system}, *turns]


def _prompt(prompt: Any, system: Any) -> Any:
    """A TRL-style prompt (text or messages) with an optional system message, normalised."""
    if isinstance(prompt, list):
        return render(_with_system(system, messages(prompt, "prompt")))
    if prompt is not None and system:
        return render(_with_system(system, [{"role": "user", "content": prompt}]))
    return prompt


def _optional(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in OPTIONAL_FIELDS if record.get(k) is not None}


def _score_margin(record: dict[str, Any]) -> dict[str, Any]:
    """UltraFeedback's scores as the pair's margin (their difference)."""
    good, bad = record.get("score_chosen"), record.get("score_rejected")
    if good is None or bad is None:
        return {}
    try:
        return {"margin": float(good) - float(bad)}
    except (TypeError, ValueError):
        raise FormatError(f"scores must be numbers, got {good!r} and {bad!r}") from None


# -- formats ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    name: str
    keys: str  # how its records look, for messages
    matches: Callable[[dict[str, Any]], bool]
    kind: Callable[[dict[str, Any]], str]
    convert: Callable[[dict[str, Any], str], dict[str, Any]]


def _is_unpaired(record: dict[str, Any]) -> bool:
    return "label" in record and "chosen" not in record and "rejected" not in record


def _unpaired(record: dict[str, Any], kind: str) -> dict[str, Any]:
    raise FormatError(
        "unpaired feedback (a completion or messages with a 'label', as KTO uses): it is neither "
        "a preference pair (prompt, chosen, rejected) nor an SFT demonstration; pair the "
        "completions of each prompt, or drop 'label' and keep only the good ones for SFT"
    )


def _pair_kind(record: dict[str, Any]) -> str:
    return "preferences"


def _explicit(record: dict[str, Any], kind: str) -> dict[str, Any]:
    out = _optional(record)
    for key in ("prompt", "chosen", "rejected"):
        if key in record:
            out[key] = record[key]
    return out


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split HH-RLHF dialogues into (prompt, chosen reply, rejected reply)."""
    # The prompt is the longest shared prefix that ends with "\n\nAssistant:".
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, shared + 1)
    if cut < 0 or (not chosen.startswith("\n\nHuman:") and not chosen.startswith("Human:")):
        raise FormatError("no shared '\\n\\nHuman: ... \\n\\nAssistant:' prompt in chosen/rejected")
    end = cut + len(HH_ASSISTANT)
    prompt = chosen[:end].strip()
    prompt = prompt.removesuffix("Assistant:").rstrip()
    prompt = prompt.removeprefix("Human:").strip() if prompt.count("Human:") == 1 else prompt
    return prompt, chosen[end:].strip(), rejected[end:].strip()


def _implicit(record: dict[str, Any], kind: str) -> dict[str, Any]:
    prompt, chosen, rejected = _split_hh(record["chosen"], record["rejected"])
    return _optional(record) | {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _is_implicit(record: dict[str, Any]) -> bool:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    return (
        "prompt" not in record
        and isinstance(chosen, str)
        and isinstance(rejected, str)
        and HH_ASSISTANT in chosen
    )


def _conversational_pair(record: dict[str, Any], kind: str) -> dict[str, Any]:
    chosen = messages(record.get("chosen") or [], "chosen")
    rejected = messages(record.get("rejected") or [], "rejected")
    prompt = record.get("prompt")
    if prompt is None:  # the shared leading messages are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise FormatError("'chosen' and 'rejected' share no leading prompt message")
    return (
        _optional(record)
        | _score_margin(record)
        | {
            "prompt": _prompt(prompt, record.get("system")),
            "chosen": _final_assistant(chosen, "chosen"),
            "rejected": _final_assistant(rejected, "rejected"),
        }
    )


def _is_conversational_pair(record: dict[str, Any]) -> bool:
    return isinstance(record.get("chosen"), list) or isinstance(record.get("rejected"), list)


def _conversational_kind(record: dict[str, Any]) -> str:
    if "chosen" in record or "rejected" in record:
        return "preferences"
    if "completion" in record:
        return "sft"
    if isinstance(record.get("messages"), list) and record["messages"]:
        last = record["messages"][-1]
        role = last.get("role", last.get("from")) if isinstance(last, dict) else None
        return "prompts" if ROLES.get(str(role).lower()) == "user" else "sft"
    return "prompts"


def _conversational(record: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind == "preferences":
        if _is_conversational_pair(record):
            return _conversational_pair(record, kind)
        return _explicit(record, kind)
    out = _optional(record)
    if "messages" in record:
        turns = _with_system(record.get("system"), messages(record["messages"], "messages"))
        if kind == "prompts":
            return out | {"prompt": render(_prompt_turns(turns, "messages"))}
        out["completion"] = _final_assistant(turns, "messages")
        out["prompt"] = render(turns[:-1]) if len(turns) > 1 else None
        return out
    if "prompt" in record:
        out["prompt"] = _prompt(record["prompt"], record.get("system"))
    if kind == "sft" and "completion" in record:
        completion = record["completion"]
        if isinstance(completion, list | dict):
            completion = _final_assistant(messages(completion, "completion"), "completion")
        out["completion"] = completion
    return out


def _sharegpt_kind(record: dict[str, Any]) -> str:
    if "chosen" in record or "rejected" in record:
        return "preferences"
    turns = record.get("conversations")
    last = turns[-1] if isinstance(turns, list) and turns else None
    role = last.get("from", last.get("role")) if isinstance(last, dict) else None
    return "sft" if ROLES.get(str(role).lower()) == "assistant" else "prompts"


def _sharegpt(record: dict[str, Any], kind: str) -> dict[str, Any]:
    turns = _with_system(record.get("system"), messages(record["conversations"], "conversations"))
    out = _optional(record)
    if kind == "preferences":
        return out | {
            "prompt": render(_prompt_turns(turns, "conversations")),
            "chosen": _final_assistant(messages(record.get("chosen"), "chosen"), "chosen"),
            "rejected": _final_assistant(messages(record.get("rejected"), "rejected"), "rejected"),
        }
    if kind == "sft":
        completion = _final_assistant(turns, "conversations")
        return out | {
            "prompt": render(turns[:-1]) if len(turns) > 1 else None,
            "completion": completion,
        }
    return out | {"prompt": render(_prompt_turns(turns, "conversations"))}


def _alpaca_kind(record: dict[str, Any]) -> str:
    if "chosen" in record or "rejected" in record or isinstance(record.get("output"), list):
        return "preferences"
    return "sft" if "output" in record else "prompts"


def _alpaca(record: dict[str, Any], kind: str) -> dict[str, Any]:
    instruction, extra = record.get("instruction"), record.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        raise FormatError("'instruction' must be non-empty text")
    if extra not in (None, "") and not isinstance(extra, str):
        raise FormatError("'input' must be text")
    turns: list[Message] = []
    for i, turn in enumerate(record.get("history") or []):
        if not (isinstance(turn, list | tuple) and len(turn) == 2):
            raise FormatError(f"'history'[{i}] must be a [user, assistant] pair")
        turns += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    turns.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    prompt = render(_with_system(record.get("system"), turns))
    out = _optional(record) | {"prompt": prompt}
    output = record.get("output")
    if kind == "preferences":
        if isinstance(output, list):
            if len(output) != 2:
                raise FormatError(
                    f"a ranking 'output' must be [chosen, rejected], got {len(output)} answers"
                )
            return out | {"chosen": output[0], "rejected": output[1]}
        return out | {k: record[k] for k in ("chosen", "rejected") if k in record}
    if kind == "sft" and "output" in record:
        out["completion"] = output
    return out


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "unpaired",
            "{messages | prompt + completion, label}",
            _is_unpaired,
            lambda r: "sft",
            _unpaired,
        ),
        Format(
            "sharegpt",
            "{conversations, [system], [chosen, rejected]}",
            lambda r: "conversations" in r,
            _sharegpt_kind,
            _sharegpt,
        ),
        Format(
            "alpaca",
            "{instruction, [input], output, [system], [history]}",
            lambda r: "instruction" in r,
            _alpaca_kind,
            _alpaca,
        ),
        Format(
            "implicit",
            "{chosen, rejected} holding HH dialogues",
            _is_implicit,
            _pair_kind,
            _implicit,
        ),
        Format(
            "ultrafeedback",
            "{prompt, chosen: [messages], rejected: [messages], score_chosen, score_rejected}",
            lambda r: _is_conversational_pair(r) and "score_chosen" in r,
            _pair_kind,
            _conversational_pair,
        ),
        Format(
            "conversational",
            "{[prompt], chosen: [messages], rejected: [messages]} | {messages} | "
            "{prompt, completion} as messages",
            lambda r: (
                _is_conversational_pair(r)
                or isinstance(r.get("messages"), list)
                or isinstance(r.get("prompt"), list)
                or isinstance(r.get("completion"), list | dict)
            ),
            _conversational_kind,
            _conversational,
        ),
        Format(
            "explicit",
            "{prompt, chosen, rejected} | {prompt, completion} | {prompt}",
            lambda r: bool({"prompt", "chosen", "rejected", "completion", "messages"} & set(r)),
            _conversational_kind,
            _conversational,
        ),
    )
}
FORMAT_NAMES = ("auto", *(name for name in FORMATS if name != "unpaired"))


def rename(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The record with its keys renamed per ``data.columns`` ({field: the file's key})."""
    if not columns:
        return record
    out = dict(record)
    for name, key in columns.items():
        if key in out and key != name:
            out[name] = out.pop(key)
    return out


def _no_format(record: dict[str, Any]) -> FormatError:
    keys = ", ".join(sorted(map(str, record))[:12]) or "none"
    tried = "; ".join(f"{f.name} {f.keys}" for f in FORMATS.values() if f.name != "unpaired")
    return FormatError(
        f"the record matches no known format (keys: {keys}). Formats tried: {tried}. "
        "Map your keys with data.columns or choose one with data.format"
    )


def find(record: dict[str, Any], fmt: str = "auto") -> Format:
    """The record's format: the first that matches (``auto``), or the chosen one."""
    if fmt != "auto":
        chosen = FORMATS[fmt]
        if _is_unpaired(record):
            return FORMATS["unpaired"]
        if not chosen.matches(record) and not (fmt == "explicit" and record):
            keys = ", ".join(sorted(map(str, record))[:12]) or "none"
            raise FormatError(f"not a {fmt} record {chosen.keys} (keys: {keys})")
        return chosen
    for candidate in FORMATS.values():
        if candidate.matches(record):
            return candidate
    raise _no_format(record)


def detect_kind(record: dict[str, Any], fmt: str = "auto") -> str:
    """Which kind of data set the record belongs to (preferences, sft, prompts)."""
    try:
        return find(record, fmt).kind(record)
    except FormatError:
        return "prompts"


def normalise(
    record: dict[str, Any], kind: str, fmt: str = "auto", columns: dict[str, str] | None = None
) -> tuple[dict[str, Any], str]:
    """(normalised fields, format name) of one record in a data set of ``kind``; raises
    FormatError naming what is wrong with it."""
    record = rename(record, columns or {})
    found = find(record, fmt)
    own = found.kind(record)
    if kind != "prompts" and own not in (kind, "prompts") and found.name != "unpaired":
        keys = ", ".join(sorted(map(str, record))[:6])
        raise FormatError(f"a record of {own} data (keys: {keys}) in a data set of {kind}")
    if "margin" in record:
        record = {**record, "margin": _margin(record["margin"])}
    name = found.name
    if name in ("explicit", "conversational"):  # TRL's forms, named as TRL names them
        name = _trl_name(record, kind)
    return found.convert(record, kind), name


def _trl_name(record: dict[str, Any], kind: str) -> str:
    if kind == "preferences":
        return "conversational" if _is_conversational_pair(record) else "explicit"
    if "messages" in record:
        return "conversational"
    return "prompt_completion" if kind == "sft" else "prompt_only"


def _margin(value: Any) -> Any:
    """A margin is a number; CSV cells are text, so "2.0" is 2.0 and an empty cell no margin."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise FormatError(f"'margin' must be a number, got {value!r}") from None
