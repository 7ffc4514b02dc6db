"""A user's own model and data, as they come: a Qwen2 checkpoint in bf16 safetensors with a ChatML
chat template, and ShareGPT files with multi-turn prompts, through `rlhf init`'s params file and
the whole pipeline, judged by the held-out judge. A GPT-2 tokenizer without a chat template is
refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from families import build_gpt2, build_qwen2, sharegpt, texts
from helpers import FEW_STEPS
from safetensors import safe_open

from rlhf_tasks.formats import prompt_messages
from rlhf_tasks.ppo import end_of_turn


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    files = sharegpt(root / "data")
    corpus = texts(files)
    return {
        **files,
        "qwen2": build_qwen2(root / "qwen2", corpus),
        "gpt2": build_gpt2(root / "gpt2", corpus),
    }


def _dtypes(model_dir: Path) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        return {str(fh.get_slice(name).get_dtype()) for name in fh.keys()}  # noqa: SIM118


def test_a_tokenizer_without_a_chat_template_is_refused_before_anything_runs(
    project: Path, real, rlhf
):
    code, _, err = rlhf(
        "init", "--model", real["gpt2"], "--data", real["train"], real["test"], real["sft"]
    )
    assert code == 2
    assert "its tokenizer has no chat template" in err and "Traceback" not in err
    code, _, err = rlhf("run", "-S", f"model.name_or_path={real['gpt2']}")
    assert code == 2
    assert f"model.name_or_path='{real['gpt2']}': its tokenizer has no chat template" in err
    assert [p.name for p in (project / "artifacts").iterdir()] == ["cache"]  # preflight's


@pytest.mark.slow
def test_a_bf16_qwen2_on_sharegpt_data_through_rlhf_init_and_the_pipeline(
    project: Path, real, rlhf
):
    data = [real["train"], real["test"], real["sft"]]
    code, out, err = rlhf("init", "--model", real["qwen2"], "--data", *data)
    assert code == 2 and "params.yaml exists; pass --force" in err
    code, out, err = rlhf("init", "--model", real["qwen2"], "--data", *data, "--force")
    assert code == 0, err
    assert "wrote params.yaml" in out and "Qwen2ForCausalLM" in out and "bfloat16" in out
    written = yaml.safe_load(Path("params.yaml").read_text())
    assert written["model"]["name_or_path"] == str(real["qwen2"])
    assert written["data"]["format"] == "sharegpt"
    assert written["data"]["preferences_heldout"] == str(real["test"])
    assert written["data"]["prompts_rl"] == str(real["train"])  # the pairs' prompts
    assert written["evaluate"]["judge"] == "heldout_rm" and written["judge"]["fraction"] == 0.2
    for length in (written["sft"]["args"]["max_length"], written["reward"]["args"]["max_length"]):
        assert length % 64 == 0 and 0 < length <= 512
    assert "keeps 100.0% of 135 rows" in Path("params.yaml").read_text()

    code, out, err = rlhf("run", *(f"-S{o}" for o in FEW_STEPS))
    assert code == 0, (out, err)

    # Multi-turn prompts reach the chat template as turns.
    first = Path("artifacts/validate/data/sft_train.jsonl").read_text().splitlines()[0]
    sft_row = json.loads(first)
    roles = [m["role"] for m in prompt_messages(sft_row["prompt"])]
    assert roles == ["system", "user", "assistant", "user"]
    # The bf16 checkpoint trained in fp32 (its master weights, saved as trained).
    assert _dtypes(real["qwen2"]) == {"BF16"}
    for stage in ("sft", "reward", "judge", "policy"):
        assert _dtypes(Path(f"artifacts/{stage}/model")) == {"F32"}, stage
    # PPO reads the score where the reward model was trained to: after ChatML's "<|im_end|>\n".
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real["qwen2"])
    assert end_of_turn(tokenizer) == tokenizer.encode("\n", add_special_tokens=False)
    # Judged by the held-out judge, never by the demo's gold judge.
    judge = json.loads(Path("artifacts/judge/metrics.json").read_text())
    assert judge["judge/trained"] == 1 and judge["judge/rows_kept"] > 0
    metrics = json.loads(Path("artifacts/evaluate/metrics.json").read_text())
    assert "judge/win_rate_vs_sft" in metrics
    assert not [key for key in metrics if key.startswith("gold/")]
    reward = json.loads(Path("artifacts/reward/metrics.json").read_text())
    assert reward["reward_model/rows_set_aside"] == judge["judge/rows_kept"]
    assert reward["reward_model/rows_read"] == 135


def test_rlhf_init_says_which_data_set_is_missing(project: Path, real, rlhf):
    code, _, err = rlhf("init", "--model", real["qwen2"], "--data", real["train"], real["sft"])
    assert code == 2
    assert "needs one training and one held-out set of preference pairs" in err
    assert f"{real['train']} (preferences, 135 rows)" in err
    code, _, err = rlhf("init", "--model", real["qwen2"], "--data", real["train"], real["test"])
    assert code == 2 and "needs one set of SFT demonstrations" in err


def test_lengths_keep_98_percent_in_steps_of_64_within_the_model():
    from rlhf_tasks.init import _fit

    assert _fit([10] * 98 + [500, 900], 1024) == (64, 0.98)
    assert _fit([100] * 50 + [130] * 50, 1024) == (192, 1.0)
    assert _fit([3000] * 10, 2048) == (2048, 0.0)  # the model's limit caps it; init says so
