"""Collecting preference pairs from people, in Label Studio (step 0 of RLHF).

    rlhf collect        prompts from the RL pool -> answers of the champion (and challenger)
                        -> pairs of distinct answers -> tasks in a Label Studio project
    rlhf collect pull   the completed annotations -> preference pairs -> ``rlhf ingest``

``collect``: ``collect.num_prompts`` prompts of ``data.prompts_rl`` (never the held-out prompts)
that the project has not been asked yet, ``collect.responses_per_prompt`` sampled answers from
each model (the registered ``champion``, and the ``challenger`` when it is another version), and
``collect.pairs_per_prompt`` pairs of distinct answers per prompt, each shown left / right in a
random order. Each task carries the pair's id, the prompt's id, the model version behind each
side, the sampling settings, and a digest of the three texts.

``pull``: Label Studio's JSON export of the project, turned into pairs. A task labelled by
several people takes the majority's choice (no majority: left out); "tie" and "both bad" are
counted and left out; the chosen strength becomes the pair's ``margin`` (``collect.margins``).
Each pair's ``id`` is ``labelstudio-<project>-<task>``, its ``annotator`` who made the majority,
and its ``source`` where it came from (server, project, task, the models of each side, the
sampling settings). A task whose pair is in the training data already is not pulled again.
Anything wrong with a task fails the whole pull, naming the task: nothing is ingested.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_tasks import data, labelstudio
from rlhf_tasks.config import Params
from rlhf_tasks.errors import ConfigError, DataError

DEFAULT_OUT = Path("artifacts/collect")
ID_PREFIX = "labelstudio"
SIDES = ("left", "right")
SKIPPED = ("tie", "both_bad")

# The pairwise template: the prompt, two answers, one choice (A, B, tie, both bad) and an optional
# strength. The aliases are what the export holds.
LABEL_CONFIG = """<View>
  <Header value="Prompt"/>
  <Text name="prompt" value="$prompt" granularity="word"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;">
      <Header value="Answer A"/>
      <Text name="left" value="$left"/>
    </View>
    <View style="flex: 1;">
      <Header value="Answer B"/>
      <Text name="right" value="$right"/>
    </View>
  </View>
  <Header value="Which answer is better?"/>
  <Choices name="preference" toName="prompt" choice="single-radio" required="true">
    <Choice value="A is better" alias="left"/>
    <Choice value="B is better" alias="right"/>
    <Choice value="Tie" alias="tie"/>
    <Choice value="Both are bad" alias="both_bad"/>
  </Choices>
  <Header value="How strongly? (optional)"/>
  <Choices name="strength" toName="prompt" choice="single-radio">
    <Choice value="slight"/>
    <Choice value="clear"/>
    <Choice value="strong"/>
  </Choices>
</View>"""


def digest(prompt: str, left: str, right: str) -> str:
    """What a task's texts were when imported: an edit in Label Studio changes it."""
    return hashlib.sha256("\0".join((prompt, left, right)).encode()).hexdigest()


def _short_id(*texts: str) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


# -- collect ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    ref: str  # NAME/version
    model: Any
    tokenizer: Any


def policies(params: Params) -> list[Policy]:
    """The champion, and the challenger when it is another version: loaded from the registry
    (on the GPU when there is one)."""
    import mlflow
    import torch

    from rlhf_tasks import promote
    from rlhf_tasks.tracking import logged_models, store

    name = promote.model_names(params)["policy"]
    client = promote._client()
    champion = promote.alias_version(client, name, promote.CHAMPION)
    if champion is None:
        raise ConfigError(f"{name} has no champion to collect answers from: run `rlhf run` first")
    versions = [champion]
    challenger = promote.alias_version(client, name, promote.CHALLENGER)
    if challenger is not None and challenger.version != champion.version:
        versions.append(challenger)
    mlflow.set_tracking_uri(store.tracking_uri())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = []
    for mv in versions:
        parts = logged_models.load_logged_model(f"models:/{mv.name}/{mv.version}", params.model)
        ref = f"{mv.name}/{mv.version}"
        loaded.append(Policy(ref, parts["model"].to(device).eval(), parts["tokenizer"]))
    return loaded


def sample_prompts(params: Params, asked: set[str]) -> list[str]:
    """``collect.num_prompts`` distinct prompts of the RL pool whose ids are not in ``asked``."""
    pool = data.load([params.data.prompts_rl], "prompts", reading=params.data.reading()).frame
    prompts = sorted({p for p in pool["prompt"] if isinstance(p, str) and p.strip()})
    fresh = [p for p in prompts if _short_id(p) not in asked]
    if not fresh:
        raise DataError(
            f"every prompt of {params.data.prompts_rl} is in the project already "
            f"({len(prompts)} prompts): add prompts to the pool, or use another collect.project"
        )
    rng = random.Random(params.collect.seed)
    return rng.sample(fresh, min(params.collect.num_prompts, len(fresh)))


def sampling(params: Params) -> dict[str, Any]:
    """The sampling settings a task records (serving.Sampling's, but the batch size)."""
    from rlhf_tasks import serving

    settings = dataclasses.asdict(serving.Sampling.of(params.collect))
    del settings["batch_size"]
    return settings


def askable(params: Params, text: str) -> bool:
    """Whether an answer may be shown to people: one the validation gate would refuse once
    labelled (empty, too long, control characters or U+FFFD, as a small model's byte-level
    tokens can produce) would fail the whole pull, so it is never asked about."""
    from rlhf_tasks.validate import CONTROL_CHARS

    cfg = params.validate_
    return (
        bool(text.strip())
        and cfg.min_chars <= len(text) <= cfg.max_chars
        and "\ufffd" not in text
        and re.search(CONTROL_CHARS, text) is None
    )


def answers(params: Params, prompts: list[str], models: list[Policy]) -> dict[str, list]:
    """Each prompt's sampled answers, as (text, model ref): distinct texts that ``askable``."""
    from rlhf_tasks import serving
    from rlhf_tasks.formats import prompt_messages

    how = serving.Sampling.of(params.collect)
    found: dict[str, list[tuple[str, str]]] = {p: [] for p in prompts}
    k = params.collect.responses_per_prompt
    for policy in models:
        conversations = [prompt_messages(p) for p in prompts for _ in range(k)]
        texts = serving.generate(policy.model, policy.tokenizer, conversations, how)
        for i, text in enumerate(texts):
            prompt = prompts[i // k]
            if askable(params, text) and text not in [t for t, _ in found[prompt]]:
                found[prompt].append((text, policy.ref))
    return found


def reward_scores(params: Params, found: dict[str, list]) -> dict[tuple[str, str], float]:
    """The champion's reward model's score of each (prompt, answer) in ``found``: the reward
    model version that holds the ``champion`` alias with the champion policy (promote gives
    both), loaded from the registry (on the GPU when there is one)."""
    import mlflow
    import torch

    from rlhf_tasks import promote, reward
    from rlhf_tasks.tracking import logged_models, store

    name = promote.model_names(params)["reward"]
    champion = promote.alias_version(promote._client(), name, promote.CHAMPION)
    if champion is None:
        raise ConfigError(
            f"collect.selection={params.collect.selection} needs the champion's reward model, but "
            f"{name} has no champion: run `rlhf run` first"
        )
    mlflow.set_tracking_uri(store.tracking_uri())
    parts = logged_models.load_logged_model(f"models:/{name}/{champion.version}", params.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts["model"] = parts["model"].to(device)
    keys = [(prompt, text) for prompt, replies in found.items() for text, _ in replies]
    scored = reward.score(
        parts["model"].eval(), parts["tokenizer"], [k[0] for k in keys], [k[1] for k in keys]
    )
    return dict(zip(keys, scored, strict=True))


def tasks(
    params: Params, found: dict[str, list], scores: dict[tuple[str, str], float] | None = None
) -> list[dict[str, Any]]:
    """Label Studio tasks: ``collect.pairs_per_prompt`` pairs of distinct answers per prompt,
    sides in a random order. Which pairs (``collect.selection``): ``random``; ``uncertain``,
    the pairs whose two answers the reward model (``scores``) tells apart least, where a
    person's label is the most new to it; or ``extremes``, those it tells apart most (its
    best-scored answer against its worst), where the policy's reward hacks meet a person's
    judgement."""
    rng = random.Random(params.collect.seed)
    settings = sampling(params)
    out = []
    for prompt, replies in found.items():
        pairs = [(a, b) for i, a in enumerate(replies) for b in replies[i + 1 :]]
        rng.shuffle(pairs)
        if params.collect.selection != "random":
            assert scores is not None, f"{params.collect.selection} needs the reward scores"
            gap = {ab: abs(scores[prompt, ab[0][0]] - scores[prompt, ab[1][0]]) for ab in pairs}
            # uncertain: closest first; extremes: widest first
            pairs.sort(key=gap.__getitem__, reverse=params.collect.selection == "extremes")
        for (text_a, model_a), (text_b, model_b) in pairs[: params.collect.pairs_per_prompt]:
            swapped = rng.random() < 0.5
            (left, left_model), (right, right_model) = (
                ((text_b, model_b), (text_a, model_a))
                if swapped
                else ((text_a, model_a), (text_b, model_b))
            )
            out.append(
                {
                    "data": {
                        "pair_id": _short_id(prompt, *sorted((text_a, text_b))),
                        "prompt_id": _short_id(prompt),
                        "prompt": prompt,
                        "left": left,
                        "right": right,
                        "left_model": left_model,
                        "right_model": right_model,
                        "swapped": swapped,
                        "sampling": settings,
                        "digest": digest(prompt, left, right),
                    }
                }
            )
    return out


def project(client: labelstudio.LabelStudio, params: Params, create: bool) -> dict[str, Any]:
    """The ``collect.project`` project; made with the pairwise template if ``create``."""
    title = params.collect.project
    try:
        return client.project(title)
    except ConfigError:
        if not create:
            raise
    description = "Which answer is better? Pairs from the RLHF pipeline's policies."
    return client.create_project(title, LABEL_CONFIG, description)


def collect(params: Params, client: labelstudio.LabelStudio) -> dict[str, Any]:
    """Sample, generate and import one collection; what was imported, and where."""
    found = project(client, params, create=True)
    asked = {t["data"].get("prompt_id") for t in client.export(found["id"], all_tasks=True)}
    prompts = sample_prompts(params, asked)
    models = policies(params)
    sampled = answers(params, prompts, models)
    scores = reward_scores(params, sampled) if params.collect.selection != "random" else None
    new = tasks(params, sampled, scores)
    if not new:
        raise DataError(
            f"the models gave no two distinct answers to any of {len(prompts)} prompts: "
            "raise collect.responses_per_prompt or collect.temperature"
        )
    imported = client.import_tasks(found["id"], new)
    return {
        "project": found["title"],
        "project_id": found["id"],
        "url": client.project_url(found["id"]),
        "prompts": len(prompts),
        "tasks": imported,
        "models": [m.ref for m in models],
    }


# -- pull ---------------------------------------------------------------------------------------
@dataclass
class Label:
    annotator: str
    choice: str
    strength: str | None


def _choice(annotation: dict[str, Any], name: str) -> str | None:
    for item in annotation.get("result") or []:
        if item.get("from_name") == name:
            chosen = (item.get("value") or {}).get("choices") or []
            return chosen[0] if chosen else None
    return None


def _labels(task: dict[str, Any], people: dict[int, str]) -> list[Label]:
    """The task's completed annotations, one per person; DataError naming the task and the
    annotation when one cannot be used."""
    labels: dict[str, Label] = {}
    where = f"task {task['id']}"
    for annotation in task.get("annotations") or []:
        if annotation.get("was_cancelled"):
            continue  # skipped by the annotator
        who = annotation.get("completed_by")
        if isinstance(who, dict):
            who = who.get("id")
        if who is None:
            raise DataError(f"{where}: annotation {annotation.get('id')} has no annotator")
        person = people.get(who, f"user-{who}")
        choice = _choice(annotation, "preference")
        if choice not in (*SIDES, *SKIPPED):
            raise DataError(
                f"{where}: annotation {annotation.get('id')} by {person} has no choice of "
                f"A, B, tie or both bad (found {choice!r})"
            )
        label = Label(person, choice, _choice(annotation, "strength"))
        earlier = labels.get(person)
        if earlier is not None and earlier.choice != label.choice:
            raise DataError(
                f"{where}: {person} labelled it two ways ({earlier.choice} and {label.choice}); "
                "delete one of the annotations in Label Studio"
            )
        labels[person] = label
    return list(labels.values())


def _majority(labels: list[Label]) -> str | None:
    counts = Counter(label.choice for label in labels).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return None
    return counts[0][0]


@dataclass
class Pulled:
    pairs: list[dict[str, Any]]
    counts: Counter
    agreement: dict[str, tuple[int, int]]  # annotator: (agreeing, tasks with several labels)


def pairs(
    params: Params, export: list[dict[str, Any]], people: dict[int, str], where: dict[str, Any]
) -> Pulled:
    """Preference pairs of the exported tasks (see the module's doc)."""
    margins = params.collect.margins
    out, counts = [], Counter()
    agreement: dict[str, list[int]] = {}
    for task in export:
        labels = _labels(task, people)
        if not labels:
            continue
        counts["completed"] += 1
        found = task.get("data") or {}
        missing = [k for k in ("prompt", "left", "right", "digest") if k not in found]
        if missing:
            raise DataError(
                f"task {task['id']}: not a task of `rlhf collect` (no {', '.join(missing)})"
            )
        if digest(found["prompt"], found["left"], found["right"]) != found["digest"]:
            raise DataError(
                f"task {task['id']}: its prompt or answers were edited in Label Studio after "
                "import, so they are no longer what the models generated; restore them or "
                "delete the task"
            )
        majority = _majority(labels)
        if len(labels) > 1:
            for label in labels:
                agreed = agreement.setdefault(label.annotator, [0, 0])
                agreed[0] += label.choice == majority
                agreed[1] += 1
        if majority is None:
            counts["no_majority"] += 1
            continue
        if majority in SKIPPED:
            counts[majority] += 1
            continue
        other = "right" if majority == "left" else "left"
        backers = sorted(
            (label for label in labels if label.choice == majority), key=lambda b: b.annotator
        )
        strengths = [margins[b.strength] for b in backers if b.strength in margins]
        source = {
            "label_studio": where["url"],
            "project": where["project_id"],
            "task": task["id"],
            "pair_id": found.get("pair_id"),
            "chosen_model": found.get(f"{majority}_model"),
            "rejected_model": found.get(f"{other}_model"),
            "sampling": found.get("sampling"),
        }
        pair = {
            "id": f"{ID_PREFIX}-{where['project_id']}-{task['id']}",
            "prompt": found["prompt"],
            "chosen": found[majority],
            "rejected": found[other],
            "annotator": "+".join(b.annotator for b in backers),
            "source": json.dumps(source, sort_keys=True),
        }
        if strengths:
            pair["margin"] = float(statistics.median(strengths))
        out.append(pair)
    totals = {who: (a, n) for who, (a, n) in agreement.items()}
    return Pulled(out, counts, totals)


def ingested_ids(params: Params) -> set[str]:
    """The ids of Label Studio pairs that the training data holds already."""
    found: set[str] = set()
    reading = params.data.reading()
    train = [params.data.preferences_train]
    for chunk in data.iter_chunks(train, "preferences", data.DEFAULT_CHUNK_ROWS, reading=reading):
        if "id" in chunk.frame:
            found |= {i for i in chunk.frame["id"] if isinstance(i, str)}
    return {i for i in found if i.startswith(f"{ID_PREFIX}-")}


def check_agreement(params: Params, pulled: Pulled) -> list[str]:
    """Annotators below ``collect.min_agreement``: DataError (``error``) or the lines to report."""
    cfg = params.collect
    if cfg.agreement_check == "off":
        return []
    low = [
        f"{who}: agrees with the majority on {a} of {n} tasks several people labelled "
        f"({a / n:.0%} < {cfg.min_agreement:.0%})"
        for who, (a, n) in sorted(pulled.agreement.items())
        if n >= cfg.min_shared and a / n < cfg.min_agreement
    ]
    if low and cfg.agreement_check == "error":
        raise DataError(
            "annotators below collect.min_agreement; nothing was ingested (review their "
            "labels, or set collect.agreement_check=warn):\n  " + "\n  ".join(low)
        )
    return low


def pull(
    params: Params, client: labelstudio.LabelStudio, out_dir: Path = DEFAULT_OUT
) -> dict[str, Any]:
    """The project's completed annotations as a batch file of new pairs for ``rlhf ingest``.
    ``batch`` is None when no completed task is new."""
    found = project(client, params, create=False)
    where = {"url": client.url, "project_id": found["id"]}
    export = client.export(found["id"])
    people = {u["id"]: u.get("email") or f"user-{u['id']}" for u in client.users()}
    pulled = pairs(params, export, people, where)
    warnings = check_agreement(params, pulled)
    done = ingested_ids(params)
    new = [p for p in pulled.pairs if p["id"] not in done]
    summary = {
        "project": found["title"],
        "project_id": found["id"],
        "completed": pulled.counts["completed"],
        "pairs": len(pulled.pairs),
        "new_pairs": len(new),
        "already_ingested": len(pulled.pairs) - len(new),
        **{k: pulled.counts[k] for k in (*SKIPPED, "no_majority")},
        "agreement": {who: a / n for who, (a, n) in pulled.agreement.items()},
        "warnings": warnings,
        "batch": None,
    }
    if new:
        batch = out_dir / "pull" / f"project-{found['id']}.jsonl"
        batch.parent.mkdir(parents=True, exist_ok=True)
        with batch.open("w", encoding="utf-8") as out:
            for pair in new:
                out.write(json.dumps(pair, ensure_ascii=False, sort_keys=True) + "\n")
        summary["batch"] = str(batch)
    return summary


def describe_pull(summary: dict[str, Any]) -> str:
    """One paragraph of what a pull found."""
    lines = [
        f"Label Studio project {summary['project_id']} {summary['project']!r}: "
        f"{summary['completed']} completed task(s) -> {summary['pairs']} pair(s) "
        f"({summary['new_pairs']} new, {summary['already_ingested']} ingested before); left out: "
        f"{summary['tie']} tie, {summary['both_bad']} both bad, "
        f"{summary['no_majority']} without a majority"
    ]
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)


# -- the demo's annotators ----------------------------------------------------------------------
def simulate(
    params: Params, client: labelstudio.LabelStudio, per_task: int = 1, seed: int = 0
) -> dict[str, int]:
    """The demo's simulated annotators (``demo.annotate``: Bradley–Terry over the gold judge)
    label the project's unlabelled tasks through Label Studio's API, each as their own user
    (``<name>@demo.local``), ``per_task`` people per task. For the embedded demo only: the gold
    judge knows nothing of other data."""
    from rlhf_tasks import demo

    found = project(client, params, create=False)
    names = sorted(demo.ANNOTATORS)
    if not 1 <= per_task <= len(names):
        raise ConfigError(f"--per-task must be 1 to {len(names)}, got {per_task}")
    open_tasks = [t for t in client.export(found["id"], all_tasks=True) if not t.get("annotations")]
    for item in open_tasks:  # all checked before any is labelled
        if demo.topic_of(item["data"]["prompt"]) is None:
            raise ConfigError(
                f"task {item['id']}: the demo's simulated annotators judge the demo's topics "
                f"only, not {item['data']['prompt'][:60]!r}: on your own data, people label"
            )
    users = {name: client.user(f"{name}@demo.local")["id"] for name in names}
    rng = random.Random(seed)
    counts: Counter = Counter()
    for item in open_tasks:
        task = item["data"]
        gold_left = demo.gold_score(task["prompt"], task["left"])
        gold_right = demo.gold_score(task["prompt"], task["right"])
        for name in rng.sample(names, per_task):
            left_wins, strength = demo.annotate(gold_left, gold_right, name, rng)
            choice = "tie" if abs(gold_left - gold_right) < 0.05 else SIDES[not left_wins]
            result = [
                {
                    "from_name": field,
                    "to_name": "prompt",
                    "type": "choices",
                    "value": {"choices": [value]},
                }
                for field, value in (("preference", choice), ("strength", strength))
            ]
            client.annotate(item["id"], result, users[name])
            counts["annotations"] += 1
        counts["tasks"] += 1
    return dict(counts)
