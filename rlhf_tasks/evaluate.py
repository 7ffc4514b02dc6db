"""Stage ``evaluate``: held-out evaluation that tells progress from reward hacking.

For the reward model, on held-out pairs: accuracy against the annotators' labels and, on the
demo, against the noise-free gold order. For the policy and the SFT model it starts from, on
held-out prompts: the reward model's mean score, KL(policy || SFT), mean length, distinct-2,
and a win rate against SFT judged by a judge the policy was not optimised against (the demo's
gold judge, or another reward model given by path: never the one PPO maximised).

Writes ``artifacts/evaluate/metrics.json`` (a flat JSON object), ``report.md`` with SFT and
policy generations side by side, and PNG plots: reward and KL over PPO updates, and reward-model
scores of chosen vs rejected held-out responses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from rlhf_tasks import demo
from rlhf_tasks.ppo import sequence_logprobs

DEFAULT_OUT = Path("artifacts/evaluate")


class EvaluateConfig(BaseModel):
    """Held-out evaluation (params.yaml section ``evaluate``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    policy: str = "artifacts/ppo/model"
    sft: str = "artifacts/sft/model"
    reward_model: str = "artifacts/reward/model"
    prompts: str = "artifacts/validate/data/prompts_heldout.jsonl"
    pairs: str = "artifacts/validate/data/preferences_heldout.jsonl"
    history: str | None = "artifacts/ppo/history.jsonl"  # PPO's per-update metrics, for plots
    judge: str = "gold"  # "gold" (the demo's judge) or the path of a held-out reward model
    samples_per_prompt: int = Field(2, gt=0)
    max_new_tokens: int = Field(40, gt=0)
    temperature: float = Field(0.7, gt=0)
    batch_size: int = Field(64, gt=0)
    report_examples: int = Field(12, ge=0)
    seed: int = 0


def _read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).open(encoding="utf-8") if line.strip()]


def _chat(tokenizer: Any, prompt: str, response: str | None = None) -> str:
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=response is None, tokenize=False
    )


@torch.no_grad()
def reward_scores(
    model: Any, tokenizer: Any, prompts: list[str], responses: list[str], batch_size: int = 64
) -> list[float]:
    """The reward model's score of each (prompt, response), rendered with the chat template."""
    scores: list[float] = []
    tokenizer.padding_side = "right"
    for i in range(0, len(prompts), batch_size):
        texts = [
            _chat(tokenizer, p, r)
            for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size], strict=True)
        ]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        scores.extend(model(**enc).logits[:, 0].float().tolist())
    return scores


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], cfg: EvaluateConfig
) -> tuple[list[str], list[float]]:
    """Sample one response per prompt; also return each response's summed log-prob under
    ``model`` (for the KL to another model, computed the same way)."""
    torch.manual_seed(cfg.seed)
    tokenizer.padding_side = "left"
    texts: list[str] = []
    for i in range(0, len(prompts), cfg.batch_size):
        chats = [_chat(tokenizer, p) for p in prompts[i : i + cfg.batch_size]]
        enc = tokenizer(chats, add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts.extend(
            tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return [t.strip() for t in texts]


@torch.no_grad()
def sequence_kl(
    policy: Any, other: Any, tokenizer: Any, prompts: list[str], responses: list[str], temp: float
) -> float:
    """Mean over samples of sum_t (log p_policy - log p_other) on the policy's own samples."""
    tokenizer.padding_side = "left"
    total = 0.0
    for prompt, response in zip(prompts, responses, strict=True):
        query = tokenizer(_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        full = tokenizer(_chat(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full])
        mask = torch.ones_like(ids)
        a = sequence_logprobs(policy, ids, mask, len(query), temp)
        b = sequence_logprobs(other, ids, mask, len(query), temp)
        total += (a - b).sum().item()
    return total / max(len(prompts), 1)


def distinct_2(texts: list[str]) -> float:
    """Distinct bigrams over all bigrams of a set of responses (word level)."""
    bigrams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)


def _win_rate(a: list[float], b: list[float]) -> float:
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)


def run(cfg: EvaluateConfig, out_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(cfg.sft)
    reward_model = AutoModelForSequenceClassification.from_pretrained(cfg.reward_model).eval()
    metrics: dict[str, float] = {}

    # The reward model on held-out pairs: the annotators' labels, and the gold order.
    pairs = _read_jsonl(cfg.pairs)
    prompts_p = [p["prompt"] for p in pairs]
    chosen = reward_scores(reward_model, tokenizer, prompts_p, [p["chosen"] for p in pairs])
    rejected = reward_scores(reward_model, tokenizer, prompts_p, [p["rejected"] for p in pairs])
    metrics["reward_model/accuracy"] = sum(
        c > r for c, r in zip(chosen, rejected, strict=True)
    ) / len(pairs)
    if cfg.judge == "gold":
        gold_right = [
            (c > r)
            == (
                demo.gold_score(p["prompt"], p["chosen"])
                > demo.gold_score(p["prompt"], p["rejected"])
            )
            for p, c, r in zip(pairs, chosen, rejected, strict=True)
        ]
        metrics["reward_model/accuracy_gold"] = sum(gold_right) / len(pairs)

    # Policy and SFT on held-out prompts.
    prompts = [r["prompt"] for r in _read_jsonl(cfg.prompts)] * cfg.samples_per_prompt
    models = {
        "sft": AutoModelForCausalLM.from_pretrained(cfg.sft).eval(),
        "policy": AutoModelForCausalLM.from_pretrained(cfg.policy).eval(),
    }
    generations = {name: generate(m, tokenizer, prompts, cfg) for name, m in models.items()}
    judge = (
        None
        if cfg.judge == "gold"
        else AutoModelForSequenceClassification.from_pretrained(cfg.judge).eval()
    )
    judged: dict[str, list[float]] = {}
    for name, texts in generations.items():
        rm = reward_scores(reward_model, tokenizer, prompts, texts)
        metrics[f"{name}/reward_mean"] = sum(rm) / len(rm)
        metrics[f"{name}/mean_length"] = sum(len(t.split()) for t in texts) / len(texts)
        metrics[f"{name}/distinct_2"] = distinct_2(texts)
        if judge is None:
            judged[name] = [demo.gold_score(p, t) for p, t in zip(prompts, texts, strict=True)]
            metrics[f"gold/{name}_score"] = sum(judged[name]) / len(texts)
        else:
            judged[name] = reward_scores(judge, tokenizer, prompts, texts)
    metrics["judge/win_rate_vs_sft"] = _win_rate(judged["policy"], judged["sft"])
    if judge is None:
        metrics["gold/win_rate_vs_sft"] = metrics["judge/win_rate_vs_sft"]
    metrics["policy/kl_to_sft"] = sequence_kl(
        models["policy"], models["sft"], tokenizer, prompts, generations["policy"], cfg.temperature
    )

    metrics = {k: round(float(v), 6) for k, v in sorted(metrics.items())}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_report(out_dir, cfg, metrics, prompts, generations, judged)
    _plot(out_dir, cfg, chosen, rejected)
    return {
        "outputs": {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.md")},
        "metrics": metrics,
    }


def _write_report(
    out_dir: Path,
    cfg: EvaluateConfig,
    metrics: dict[str, float],
    prompts: list[str],
    generations: dict[str, list[str]],
    judged: dict[str, list[float]],
) -> None:
    lines = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.4g} |" for k, v in metrics.items()]
    judge = "gold judge" if cfg.judge == "gold" else f"judge `{cfg.judge}`"
    lines += ["", f"## Generations on held-out prompts ({judge} score in brackets)", ""]
    lines += ["| prompt | SFT | policy |", "|---|---|---|"]
    for i in range(min(cfg.report_examples, len(prompts))):
        cells = [prompts[i]] + [
            f"{generations[n][i]} [{judged[n][i]:.2f}]" for n in ("sft", "policy")
        ]
        lines.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot(out_dir: Path, cfg: EvaluateConfig, chosen: list[float], rejected: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([chosen, rejected], bins=30, label=["chosen", "rejected"], alpha=0.7)
    ax.set(
        xlabel="reward-model score", ylabel="held-out pairs", title="Reward model on held-out pairs"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "reward_model_scores.png", dpi=100)
    plt.close(fig)
    if cfg.history and Path(cfg.history).exists():
        history = _read_jsonl(cfg.history)
        steps = [row["episode"] for row in history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(steps, [r["objective/scores"] for r in history], label="score")
        a.plot(steps, [r["objective/rlhf_reward"] for r in history], label="score - KL penalty")
        a.set(xlabel="episode", title="Reward during PPO")
        a.legend()
        b.plot(steps, [r["objective/kl"] for r in history])
        b.set(xlabel="episode", title="KL(policy || SFT) during PPO")
        fig.tight_layout()
        fig.savefig(out_dir / "ppo_reward_kl.png", dpi=100)
        plt.close(fig)
