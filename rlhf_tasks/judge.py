"""Stage ``judge``: a reward model to judge the policy with, trained on pairs the policy's reward
model never saw (``evaluate.judge: heldout_rm``).

    rlhf stage judge [-S judge.fraction=0.2]

The ``reward`` stage trains on the training pairs less ``judge.fraction`` of their prompts
(``reward.judge_split``: a hash of each prompt's text decides); this stage trains a second reward
model on those, exactly as the reward stage trains its own (``reward.init_from``, ``reward.args``,
LoRA, resources; its own seed ``judge.seed``), and scores the same held-out pairs. A policy that
games its reward model then meets a judge with other blind spots: the held-out judge of
Gao et al. (2023, reward-model overoptimisation) and AlpacaFarm, where the demo's gold judge does
not exist. Writes, under ``artifacts/judge/``:

    model/           the judge: a sequence-classification model directory with its tokenizer
    metrics.json     its held-out accuracy, loss and row counts (``judge/...``)

With ``judge.fraction`` 0 (the demo: its judge is ``gold``) nothing is trained: ``model/`` holds
only a note that says so, and ``metrics.json`` ``{"judge/trained": 0}``, so that DVC and the
evaluate stage always find the stage's outputs.
"""

from __future__ import annotations

import shutil
from typing import Any

from rlhf_tasks import reward
from rlhf_tasks.config import Params
from rlhf_tasks.errors import DataError
from rlhf_tasks.locations import StageIO
from rlhf_tasks.rows import RowCounts
from rlhf_tasks.training import read_jsonl, write_json

NOT_TRAINED = "NOT_TRAINED.md"


def trained(model_dir: Any) -> bool:
    """Whether ``model_dir`` (the stage's model output) holds a judge, not the note."""
    return (model_dir / "config.json").exists()


def run(params: Params, io: StageIO) -> dict[str, Any]:
    model_dir = io.outputs["model"]
    outputs = {"model": str(model_dir), "metrics": str(io.outputs["metrics"])}
    if not params.judge.fraction:
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        (model_dir / NOT_TRAINED).write_text(
            "No judge was trained: judge.fraction is 0. Set it (e.g. 0.2) with "
            "evaluate.judge: heldout_rm to judge the policy with a reward model trained on "
            "pairs its own reward model never saw.\n",
            encoding="utf-8",
        )
        metrics = {"judge/trained": 0}
        write_json(io.outputs["metrics"], metrics)
        print("judge: none trained (judge.fraction is 0)")
        return {"outputs": outputs, "metrics": metrics}
    rows = read_jsonl(io.inputs["preferences_train"], "judge")
    _, judges = reward.judge_split(rows, params)
    if not judges:
        raise DataError(
            f"judge: judge.fraction = {params.judge.fraction} of the prompts of "
            f"{io.inputs['preferences_train']} is no pair at all ({len(rows)} pairs): raise "
            "judge.fraction or add pairs"
        )
    counts = RowCounts(
        "judge",
        "reward",
        read=len(rows),
        kept=len(judges),
        set_aside=len(rows) - len(judges),
        set_aside_for="the reward model",
    )
    (model_dir / NOT_TRAINED).unlink(missing_ok=True)
    extra = {"judge/trained": 1}
    return reward.train("judge", params, io, judges, counts, params.judge.seed, extra)
