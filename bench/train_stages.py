"""Wall time and metrics of the training stages (sft, then reward) with params.yaml's values.

    .venv/bin/python bench/train_stages.py [--out DIR] [-S section.key=value ...]

Runs ``sft.run`` and ``reward.run`` as ``rlhf stage`` does, but writes into DIR (default: a
temporary directory) instead of ``artifacts/``, so that the pipeline's outputs are left alone;
the reward model starts from that run's SFT model. Reads ``artifacts/base_model`` and
``artifacts/validate/data`` (run `make demo`, or `rlhf stage base_model` and `rlhf stage
validate`, first). Prints each stage's wall time (model loading and tokenization included),
its metrics, and a few generations of the SFT model for held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rlhf_tasks.config import load_params
from rlhf_tasks.stages import call

PROMPTS = [  # held-out prompt templates of the demo task
    "Tell me about dogs.",
    "Write a sentence about bread briefly.",
    "Explain rain to me.",
    "Say something nice about gardens for a school report.",
    "Give me a fact about music.",
]


def generations(model_dir: Path, sample: bool) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    out = []
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,  # "<s>Human: ...\n\nAssistant:"
            return_tensors="pt",
            return_dict=True,
        )
        tokens = model.generate(
            **inputs, max_new_tokens=40, do_sample=sample, pad_token_id=tokenizer.pad_token_id
        )
        out.append(tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output directory (default: a temporary one)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        params = load_params("params.yaml", args.overrides)
        print(f"torch threads: {torch.get_num_threads()}, CUDA: {torch.cuda.is_available()}")

        t0 = time.perf_counter()
        sft_result = call("sft", params, out_root=out)
        t1 = time.perf_counter()
        sft_model = sft_result["outputs"]["model"]
        params = load_params("params.yaml", [*args.overrides, f"reward.init_from={sft_model}"])
        reward_result = call("reward", params, out_root=out)
        t2 = time.perf_counter()

        print(f"\nsft:    {t1 - t0:6.1f} s wall")
        print(json.dumps(sft_result["metrics"], indent=2))
        print(f"reward: {t2 - t1:6.1f} s wall")
        print(json.dumps(reward_result["metrics"], indent=2))
        print(f"total:  {t2 - t0:6.1f} s wall\n")
        for sample in (False, True):
            print("SFT generations, " + ("sampled (T=1)" if sample else "greedy"))
            for prompt, text in zip(PROMPTS, generations(Path(sft_model), sample), strict=True):
                print(f"  {prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
