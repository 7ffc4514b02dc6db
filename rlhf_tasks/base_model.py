"""Stage ``base_model``: the base causal LM that every training stage starts from.

For the embedded demo (``model.name_or_path`` is this stage's output directory) it builds a tiny
model locally, since nothing can be downloaded: a byte-level BPE tokenizer trained on the demo
corpus and a Llama-architecture causal LM of a few layers with random initialisation, saved as a
standard Hugging Face model directory (``config.json``, ``model.safetensors``, tokenizer files,
chat template). Sizes come from ``params.yaml``'s ``base_model`` section.

For a real run ``model.name_or_path`` is a hub id or a local directory; this stage then saves
that model's tokenizer and config into the output directory (no weights) with ``source.json``,
so that the run records exactly which tokenizer it validated and trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf_tasks.config import Params
from rlhf_tasks.locations import StageIO

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
# Single-turn and multi-turn chats render as the HH-style transcript the data loaders produce.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}Human: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}"
    "{% else %}System: {{ message['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(texts, vocab_size, list(SPECIAL_TOKENS.values()))
    bos = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        **SPECIAL_TOKENS,
    )


def build(params: Params, io: StageIO) -> dict[str, Any]:
    """The ``base_model`` stage: the base model in its output ``model`` (see ``build_in``)."""
    return build_in(params, io.outputs["model"])


def build_in(params: Params, out_dir: Path) -> dict[str, Any]:
    """Build (demo) or describe (real run) the base model in ``out_dir``; return the result."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf_tasks import demo

    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(params.model.name_or_path).resolve() != out_dir.resolve():
        source = params.model.name_or_path
        remote = params.model.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
        tokenizer.init_kwargs.pop("local_files_only", None)  # not HF_HUB_OFFLINE's value
        tokenizer.save_pretrained(out_dir)
        AutoConfig.from_pretrained(source, trust_remote_code=remote).save_pretrained(out_dir)
        (out_dir / "source.json").write_text(json.dumps({"name_or_path": source}, indent=2) + "\n")
        return {"outputs": {"model": source, "tokenizer": str(out_dir)}, "metrics": {}}

    cfg = params.base_model
    tokenizer = build_tokenizer(demo.corpus(cfg.seed), cfg.vocab_size, cfg.max_length)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "outputs": {"model": str(out_dir), "tokenizer": str(out_dir)},
        "metrics": {
            "base_model/parameters": float(n_params),
            "base_model/vocab": float(len(tokenizer)),
        },
    }
