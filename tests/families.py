"""Small models of real families, built locally as hub checkpoints are shipped, and a data set in
ShareGPT's shape with multi-turn prompts: what a user brings instead of the demo.

- ``build_qwen2``: a Qwen2 causal LM with a ChatML chat template (``<|im_start|>role\\n...
  <|im_end|>\\n``: the turn ends with a newline after the EOS), its byte-level BPE tokenizer
  trained on the given texts, weights saved in bf16 safetensors;
- ``build_gpt2``: a GPT-2 causal LM whose tokenizer has no chat template;
- ``sharegpt``: preference pairs (training and held-out, no prompt shared) and SFT conversations.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOPICS = [
    "dogs", "cats", "rain", "bread", "music", "rivers", "stars", "trees", "bees", "snow",
    "boats", "clocks", "maps", "tea", "owls", "bikes", "kites", "caves", "shells", "moths",
]  # fmt: skip
ASKS = ["Tell me about {}.", "What do you know about {}?", "Describe {} to me."]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Anything else?"]


def _tokenizer(texts: list[str], specials: list[str], vocab: int, **kwargs):
    from transformers import PreTrainedTokenizerFast

    from rlhf_tasks.base_model import train_bpe

    tok = train_bpe(texts, vocab, specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **kwargs)


def build_qwen2(dest: Path, texts: list[str]) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tokenizer(
        texts,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        600,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
        model_max_length=512,
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def build_gpt2(dest: Path, texts: list[str]) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _tokenizer(
        texts, ["<|endoftext|>"], 400, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=256,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def _good(topic: str, i: int) -> str:
    return f"{topic.capitalize()} are interesting in many ways. Fact {i}: people like {topic}."


def _bad(topic: str, i: int) -> str:
    return f"I do not want to talk about {topic}, number {i}."


def _conversation(topic: str, ask: int, follow: int) -> list[dict[str, str]]:
    return [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": ASKS[ask].format(topic)},
        {"from": "gpt", "value": _good(topic, 0)},
        {"from": "human", "value": FOLLOW_UPS[follow]},
    ]


def sharegpt(root: Path) -> dict[str, Path]:
    """ShareGPT-format files under ``root``: preferences train (the first 15 topics), held-out
    (the last 5: no prompt shared with training) and SFT; returns their paths by role."""
    out = {
        "train": root / "preferences/train.jsonl",
        "test": root / "preferences/test.jsonl",
        "sft": root / "sft/train.jsonl",
    }
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {key: [] for key in out}
    for t, topic in enumerate(TOPICS):
        split = "train" if t < 15 else "test"
        for ask in range(len(ASKS)):
            for follow in range(len(FOLLOW_UPS)):
                i = ask * 3 + follow
                records[split].append(
                    {
                        "conversations": _conversation(topic, ask, follow),
                        "chosen": {"from": "gpt", "value": _good(topic, i + 1)},
                        "rejected": {"from": "gpt", "value": _bad(topic, i + 1)},
                    }
                )
                if split == "train":
                    records["sft"].append(
                        {
                            "conversations": [
                                *_conversation(topic, ask, follow),
                                {"from": "gpt", "value": _good(topic, i + 1)},
                            ]
                        }
                    )
    for key, path in out.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in records[key]), encoding="utf-8")
    return out


def texts(files: dict[str, Path]) -> list[str]:
    """Every string in the files, to train a tokenizer on (with ChatML's role names)."""
    found = ["system user assistant\n"]
    for path in files.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            turns = [*record.get("conversations", [])]
            turns += [record[k] for k in ("chosen", "rejected") if k in record]
            found += [turn["value"] for turn in turns]
    return found
