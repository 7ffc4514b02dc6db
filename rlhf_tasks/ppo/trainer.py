"""The PPO trainer: ``train`` sets up the models (``_setup``), resumes from the last checkpoint,
then runs the updates and writes the outputs (``_finish``).

One update = one rollout batch: sample responses to ``rollout_batch_size`` prompts, score them
and compute advantages (``rollout``), then ``ppo_epochs`` passes of minibatch updates of the
policy and the value model (``ppo_epochs``), then a row of metrics (``_metrics_row``) and now and
then a checkpoint. All randomness of update ``u`` comes from seeding with ``seed + u`` at its
start, so a run resumed from a checkpoint makes exactly the updates an uninterrupted run makes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_tasks.config import ModelConfig, PpoSection
from rlhf_tasks.models import load_tokenizer, model_kwargs
from rlhf_tasks.ppo.checkpoint import SigtermCheckpoint, _State
from rlhf_tasks.ppo.maths import KLController, policy_loss, value_loss
from rlhf_tasks.ppo.rollout import (
    Columns,
    Models,
    Rollout,
    ValueModel,
    draw_prompts,
    end_of_turn,
    load_prompts,
    response_logprobs,
    response_values,
    rollout,
)
from rlhf_tasks.training import lora_config


def train(
    cfg: PpoSection,
    *,
    policy: str | Path,
    reward_model: str | Path,
    prompts: str | Path,
    out_dir: Path,
    value_model: str | Path | None = None,
    run_id: str = "",
    model_cfg: ModelConfig | None = None,
    on_update: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run PPO from the model at ``policy`` (also the frozen reference of the KL penalty) against
    the reward model at ``reward_model``, on the prompts of a JSONL file; the value model starts
    from ``value_model`` (default: the reward model). Resumes from the last checkpoint in
    ``out_dir/checkpoints`` if they were written by the same ``run_id`` (a digest of params and
    inputs; see ``training.claim_checkpoints``). Writes the policy to ``out_dir/model`` (a plain
    model directory; a LoRA adapter is merged), the per-update metrics to
    ``out_dir/history.jsonl`` and the final metrics to ``out_dir/metrics.json``. The main
    process calls ``on_update(row)`` with each update's metrics (row["update"] is the step).
    The result's ``timing`` says where this process's time went (``PhaseClock.report``).
    Models load as ``model_cfg`` (params' ``model``) allows: see ``models.model_kwargs``."""
    run = _setup(cfg, policy, reward_model, value_model, model_cfg)
    state, accelerator = run.state, run.state.accelerator
    prompt_ids, counts = load_prompts(Path(prompts), run.models.tokenizer, cfg)
    if accelerator.is_main_process:
        print(counts.summary())
    counts.check(cfg.max_dropped_fraction)
    start, history = state.resume(out_dir, run_id)

    # With several processes (DDP under `accelerate launch`) each answers its own share of the
    # update's prompts; gradients are averaged by DDP, the logged statistics by a reduce.
    per_process = cfg.rollout_batch_size // accelerator.num_processes
    mine = slice(
        accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process
    )
    clock = PhaseClock(accelerator.device)
    loop_start = time.perf_counter()
    progress = tqdm(
        range(start, run.n_updates),
        desc="ppo",
        initial=start,
        total=run.n_updates,
        disable=not accelerator.is_main_process,
    )
    with SigtermCheckpoint(accelerator) as sigterm:
        for update in progress:
            torch.manual_seed(cfg.seed + update)  # all of this update's randomness comes from here
            prompt_batch = draw_prompts(prompt_ids, cfg.rollout_batch_size, mine)
            if accelerator.process_index:  # each process samples its own stream (the first
                torch.manual_seed(cfg.seed + update + 1_000_003 * accelerator.process_index)
            batch = rollout(run.models, prompt_batch, cfg, state.kl_ctl.value, clock)
            with clock("optimisation"):
                stats = ppo_epochs(run, batch, cfg)
                state.policy_sched.step()  # the learning rates decay once per update
                state.value_sched.step()

            # Metrics under TRL's names, the KL controller, a checkpoint now and then.
            row = _metrics_row(run, batch, stats, update, cfg)
            history.append(row)
            if on_update is not None and accelerator.is_main_process:
                on_update(row)
            mean_kl = row["objective/kl"]
            state.kl_ctl.update(mean_kl, cfg.rollout_batch_size)
            progress.set_postfix(score=f"{row['objective/scores']:.2f}", kl=f"{mean_kl:.2f}")
            last = update + 1 == run.n_updates
            stopping = sigterm.requested()
            save = (update + 1) % cfg.save_every == 0 or last or stopping
            checkpoint = out_dir / "checkpoints" / f"update-{update + 1}"
            if save and accelerator.is_main_process:
                state.save(checkpoint, history, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
            if stopping:
                if accelerator.is_main_process:
                    print(
                        f"SIGTERM: PPO stopped after update {update + 1} of {run.n_updates}; "
                        f"the next run resumes from {checkpoint}",
                        flush=True,
                    )
                sigterm.stop()

    timing = clock.report(
        (run.n_updates - start) * cfg.rollout_batch_size,
        setup_s=loop_start - run.started,
        loop_s=time.perf_counter() - loop_start,
    )
    metrics = _finish(run, cfg, out_dir, history, counts.metrics())
    return {
        "outputs": {"model": str(out_dir / "model"), "history": str(out_dir / "history.jsonl")},
        "metrics": metrics,
        "resumed_from_update": start,
        "num_processes": accelerator.num_processes,
        "timing": timing,
    }


@dataclass
class _Run:
    """What ``_setup`` builds for a run."""

    models: Models
    state: _State  # what an update changes and a checkpoint holds: optimisers, schedulers, KL
    trainable: list[torch.nn.Parameter]  # the policy's parameters that train (LoRA: the adapter)
    n_updates: int
    started: float  # time.perf_counter() when the setup began, for the timing's setup_s


def _setup(
    cfg: PpoSection,
    policy: str | Path,
    reward_model: str | Path,
    value_model: str | Path | None,
    model_cfg: ModelConfig | None,
) -> _Run:
    """Load the tokenizer and the four models, build the optimisers and their learning-rate
    schedules, and hand the trained models and optimisers to accelerate."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    started = time.perf_counter()  # setup_s leaves out importing accelerate and transformers
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available()
    )
    device = accelerator.device
    remote = model_kwargs(model_cfg)  # remote code and pickled weights only if params allow
    tokenizer = load_tokenizer(str(policy), remote["trust_remote_code"], "policy")

    # Models: the policy; the frozen reference for the KL penalty (a copy of the initial policy,
    # or with LoRA the policy with its adapter disabled); the frozen reward model; the value model.
    # All in fp32 whatever the checkpoint's dtype (a bf16 checkpoint would otherwise train bf16
    # master weights, whose updates round away at RLHF learning rates); bf16 comes from autocast
    # (ppo.mixed_precision), for every model alike. Every dropout is off: PPO's ratios need
    # deterministic forward passes.
    load = {**remote, "dtype": torch.float32}

    def causal_lm() -> Any:
        config = _no_dropout(policy, remote)
        return AutoModelForCausalLM.from_pretrained(policy, config=config, **load)

    def scorer_model(location: str | Path) -> Any:
        config = _no_dropout(location, remote)
        return AutoModelForSequenceClassification.from_pretrained(location, config=config, **load)

    policy_model = causal_lm()
    ref_policy = None
    if cfg.lora.enabled:
        from peft import get_peft_model

        policy_model = get_peft_model(policy_model, lora_config(cfg.lora, "CAUSAL_LM"))
    else:
        ref_policy = causal_lm().to(device).eval()
    scorer = scorer_model(reward_model).to(device).eval()
    critic = scorer_model(value_model or reward_model)
    for model in (policy_model, critic):
        for module in model.modules():  # modules that read a dropout rate of their own
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    critic = ValueModel(critic)

    n_updates = max(1, cfg.total_episodes // cfg.rollout_batch_size)
    trainable = [p for p in policy_model.parameters() if p.requires_grad]
    # fused: one kernel per step for all tensors, on CPU as on CUDA (PyTorch's default is a loop
    # over tensors on CPU; measured on the demo's policy, 0.18 ms a step against 0.60 for foreach).
    policy_opt = torch.optim.AdamW(
        _decay_groups(trainable, cfg.weight_decay), lr=cfg.learning_rate, eps=1e-5, fused=True
    )
    value_opt = torch.optim.AdamW(
        _decay_groups(list(critic.parameters()), cfg.weight_decay),
        lr=cfg.value_learning_rate,
        eps=1e-5,
        fused=True,
    )
    # Linear decay to 0 over the run, one scheduler step per update.
    policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, lambda u: 1 - u / n_updates)
    value_sched = torch.optim.lr_scheduler.LambdaLR(value_opt, lambda u: 1 - u / n_updates)
    policy_model, critic, policy_opt, value_opt = accelerator.prepare(
        policy_model, critic, policy_opt, value_opt
    )
    state = _State(
        accelerator,
        policy_model,
        critic,
        policy_opt,
        value_opt,
        policy_sched,
        value_sched,
        KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon),
    )
    models = Models(
        accelerator, policy_model, critic, scorer, ref_policy, tokenizer, end_of_turn(tokenizer)
    )
    return _Run(models, state, trainable, n_updates, started)


def _no_dropout(location: str | Path, remote: dict[str, Any]) -> Any:
    """The model's config with every dropout rate 0 (``attention_dropout``, ``hidden_dropout``,
    ``resid_pdrop``, ...: each family names its own; some read them as plain floats)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location, trust_remote_code=remote["trust_remote_code"])
    for key, value in list(vars(config).items()):
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def _decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices only, never on biases, norms' scales or
    the value head's bias (one-dimensional parameters); none at all by default (TRL and
    InstructGPT use 0)."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def ppo_epochs(run: _Run, batch: Rollout, cfg: PpoSection) -> dict[str, list[float]]:
    """``cfg.ppo_epochs`` passes over the rollout in shuffled minibatches; on each minibatch one
    step of both optimisers on the clipped policy loss plus ``vf_coef`` times the clipped value
    loss, the gradients of both clipped to ``max_grad_norm`` together. Returns each minibatch's
    statistics under short names: the losses ("pg", "vf"), "approxkl", the clip fractions
    ("clip", "vclip") and the mean "ratio"."""
    state, policy, critic = run.state, run.models.policy, run.models.critic
    accelerator, context_len = state.accelerator, batch.context_len
    policy.train()
    critic.train()
    stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "approxkl", "clip", "vclip")}
    stats["ratio"] = []
    # mini_batch_size counts the episodes of one optimiser step over all processes: each
    # process takes its share (config checks that the process count divides it).
    per_process = cfg.mini_batch_size // accelerator.num_processes
    # Each minibatch goes forward and backward in micro-batches of at most micro_batch_size
    # episodes (bounded memory: one forward holds (batch, length, vocabulary) logits), each
    # micro-batch's token means weighted by its share of the minibatch's real tokens, so that the
    # accumulated gradient is the minibatch's own; one optimiser step per minibatch.
    micro = min(cfg.micro_batch_size or per_process, per_process)
    names = ("pg", "vf", "approxkl", "clip", "vclip", "ratio")
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(len(batch.sequences)).split(per_process):
            tokens = batch.mask[idx].sum()
            parts = idx.split(micro)
            totals = dict.fromkeys(names, 0.0)
            for i, part in enumerate(parts):
                seq, att, m = batch.sequences[part], batch.attention[part], batch.mask[part]
                weight = m.sum() / tokens
                cols = Columns.of(att, m, context_len)
                new_logprobs = response_logprobs(policy, seq, att, cols, cfg.temperature)
                pg = policy_loss(
                    new_logprobs, batch.logprobs[part], batch.advantages[part], m, cfg.cliprange
                )
                new_values = response_values(critic, seq, att, cols)
                vf, vclip = value_loss(
                    new_values, batch.values[part], batch.returns[part], m, cfg.cliprange_value
                )
                last = i == len(parts) - 1
                # Under DDP, gradients are synchronised once, on the minibatch's last backward.
                with _no_sync(accelerator, (policy, critic), skip=last):
                    accelerator.backward(weight * (pg.loss + cfg.vf_coef * vf))
                for key, value in zip(
                    names, (pg.loss, vf, pg.approxkl, pg.clipfrac, vclip, pg.ratio), strict=True
                ):
                    totals[key] += (weight * value).item()
            # One norm over policy and value together, as TRL's PPO (one wrapped model): a
            # large value gradient also shortens the policy's step. Measured on the demo (3
            # seeds): gold 4.075 against 4.009 with each clipped apart, TRL's 4.087.
            accelerator.clip_grad_norm_([*run.trainable, *critic.parameters()], cfg.max_grad_norm)
            state.policy_opt.step()
            state.value_opt.step()
            state.policy_opt.zero_grad()
            state.value_opt.zero_grad()
            for key in names:
                stats[key].append(totals[key])
    return stats


@contextlib.contextmanager
def _no_sync(accelerator: Any, models: tuple[Any, ...], skip: bool) -> Iterator[None]:
    """``accelerator.no_sync`` of every model, unless ``skip``."""
    with contextlib.ExitStack() as stack:
        if not skip:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield


def _metrics_row(
    run: _Run, batch: Rollout, stats: dict[str, list[float]], update: int, cfg: PpoSection
) -> dict[str, float]:
    """The metrics of an update under TRL's names, taken before the KL controller moves. With
    several processes, the mean over all of them: the whole update's, not this process's."""
    accelerator, kl_ctl = run.state.accelerator, run.state.kl_ctl
    kl, scores = batch.kl, batch.scores
    mean_kl = kl.sum(1).mean().item()
    row = {
        "update": update + 1,
        "episode": (update + 1) * cfg.rollout_batch_size,
        "objective/kl": mean_kl,
        "objective/scores": scores.mean().item(),
        "objective/rlhf_reward": (scores - kl_ctl.value * kl.sum(1)).mean().item(),
        "objective/kl_coef": kl_ctl.value,
        "policy/approxkl_avg": _mean(stats["approxkl"]),
        "policy/clipfrac_avg": _mean(stats["clip"]),
        "loss/policy_avg": _mean(stats["pg"]),
        "loss/value_avg": _mean(stats["vf"]),
        "val/clipfrac_avg": _mean(stats["vclip"]),
        "val/ratio": _mean(stats["ratio"]),
        "val/ratio_first": stats["ratio"][0],
        "val/approxkl_first": stats["approxkl"][0],
        "val/num_eos_tokens": batch.has_eos.sum().item(),
        "val/response_length": batch.mask.sum(1).float().mean().item(),
        "lr": run.state.policy_sched.get_last_lr()[0],
    }
    if accelerator.num_processes > 1:
        values = accelerator.reduce(
            torch.tensor(list(row.values()), device=accelerator.device), "mean"
        )
        row = dict(zip(row, values.tolist(), strict=True))
        row["update"], row["episode"] = update + 1, (update + 1) * cfg.rollout_batch_size
    return row


def _finish(
    run: _Run, cfg: PpoSection, out_dir: Path, history: list[dict], rows: dict[str, int]
) -> dict[str, float]:
    """Write the outputs (main process): the policy to ``out_dir/model`` (a LoRA adapter merged
    into it), every update's metrics to ``history.jsonl``, the last update's and the prompts'
    ``rows`` counts to ``metrics.json``. Return those metrics (the keys with a "/": not update,
    episode, lr)."""
    accelerator = run.state.accelerator
    model_dir = out_dir / "model"
    final = history[-1] if history else {}
    metrics = {k: v for k, v in final.items() if "/" in k} | rows
    if accelerator.is_main_process:
        final_policy = accelerator.unwrap_model(run.models.policy)
        if cfg.lora.enabled:
            final_policy = final_policy.merge_and_unload()
        shutil.rmtree(model_dir, ignore_errors=True)
        final_policy.save_pretrained(model_dir, safe_serialization=True)
        run.models.tokenizer.save_pretrained(model_dir)
        with (out_dir / "history.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in history)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    return metrics


class PhaseClock:
    """Wall seconds spent in each phase of the updates (``with clock("generation"): ...``). On a
    GPU each phase waits for its kernels before it stops the clock, so the figures add up."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def report(self, episodes: int, setup_s: float, loop_s: float) -> dict[str, float]:
        """Episodes per second of the update loop, and where its time went (``other``:
        metrics, checkpoints, the progress bar)."""
        phases = {f"{k}_s": v for k, v in self.seconds.items()}
        return {
            "episodes": episodes,
            "episodes_per_s": episodes / loop_s if loop_s else 0.0,
            "setup_s": setup_s,  # loading the models, the prompts, a checkpoint
            "loop_s": loop_s,
            **phases,
            "other_s": max(loop_s - sum(self.seconds.values()), 0.0),
        }


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)
