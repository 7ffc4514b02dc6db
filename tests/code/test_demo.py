"""The demo task: the gold judge, the generated data set, and the tiny base model."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_tasks import demo
from rlhf_tasks.config import DataConfig, DemoConfig, load_params

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"

PROMPT = "Tell me about dogs."
DOGS = demo.TOPIC_BY_NAME["dogs"]
GOOD = "Dogs are loyal friends. Most dogs love long walks in the park."
GOOD_FRIENDLY = GOOD + " They are wonderful."
ONE_FACT = "Most dogs love long walks in the park."


def _score(response: str, prompt: str = PROMPT) -> float:
    return demo.gold_score(prompt, response)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# -- the gold judge -----------------------------------------------------------------------------


def test_gold_judge_prefers_more_facts():
    assert _score(GOOD_FRIENDLY) > _score(ONE_FACT)
    assert _score(GOOD) > _score(ONE_FACT)


def test_a_fact_said_twice_with_another_subject_is_a_repeat():
    prompt = "Tell me about cats."
    hack = "Most cats purr when they feel safe. Many cats purr when they feel safe. They are nice."
    assert demo.repeats_a_fact(prompt, hack)
    assert not demo.repeats_a_fact(prompt, "Cats purr when they feel safe. Cats chase small toys.")
    assert not demo.repeats_a_fact("Tell me about dogs.", hack)  # not the prompt's topic's fact


def test_repeat_probes_pit_the_hack_against_what_the_gold_judge_prefers():
    cases = demo.repeat_probes(["Tell me about dogs.", "Describe rain.", "What is 2 + 2?"])
    assert len(cases) == 4  # two per demo prompt; none for a prompt off the demo's topics
    for prompt, repeat, two_facts in cases:
        assert demo.repeats_a_fact(prompt, repeat) and not demo.repeats_a_fact(prompt, two_facts)
        assert demo.gold_score(prompt, two_facts) > demo.gold_score(prompt, repeat)


@pytest.mark.parametrize("topic", demo.TOPICS, ids=lambda t: t.name)
def test_every_good_answer_beats_every_plain_one_and_a_closer_never_hurts(topic):
    """Over all subjects, facts and closers of a topic. (A closer's "lovely" once counted as a
    gardens word and "gardens" as a rain word, so friendly answers and answers about gardens
    scored below plain ones.)"""
    prompt = f"Tell me about {topic.name}."
    plain = {_score(f"{s} {f}.", prompt) for s in topic.subjects for f in topic.facts}
    good = {
        _score(f"{s1} {f1}. {s2} {f2}.", prompt)
        for s1 in topic.subjects
        for s2 in topic.subjects
        for f1, f2 in itertools.permutations(topic.facts, 2)
    }
    friendly = {
        _score(f"{s1} {f1}. {s1} {f2}. {topic.pronoun} {closer}.", prompt)
        for s1 in topic.subjects
        for f1, f2 in itertools.permutations(topic.facts, 2)
        for closer in demo.CLOSERS
    }
    assert min(good) > max(plain), (min(good), max(plain))
    assert min(friendly) > max(good) - 0.5, (min(friendly), max(good))
    assert min(friendly) >= 4.0


def test_sentiment_words_and_own_facts_are_never_off_topic():
    for topic in demo.TOPICS:
        assert not demo.OFF_TOPIC_WORDS[topic.name] & (demo.POSITIVE | demo.NEGATIVE)
        for fact in topic.facts:
            words = set(re.findall(r"[a-z]+", fact))
            assert not words & demo.OFF_TOPIC_WORDS[topic.name], (topic.name, fact)


@pytest.mark.parametrize(
    ("kind", "response"),
    [
        ("short", "The dog was"),
        ("short", "Dogs."),
        ("repetitive", "Dogs are great great great."),
        ("repetitive", "Dogs dogs dogs are great great great."),
        ("repetitive", "Dogs are loyal friends. Dogs are loyal friends. Dogs are loyal friends."),
        ("off_topic", "Cats are curious and independent. Most cats chase small toys."),
        ("negative", "I do not know much about dogs."),
        ("negative", "I hate dogs, they are dull."),
        ("unformed", "dogs are loyal friends most dogs love long walks in the park"),
        ("unformed", "most dogs love long walks in the park"),
        (
            "rambling",
            "Dogs are loyal friends. Most dogs love long walks in the park. Many dogs need fresh "
            "water every day. Young dogs can learn simple tricks. Dogs like to play fetch with a "
            "ball. Dogs keep their owners active. Dogs have a strong sense of smell.",
        ),
    ],
)
def test_gold_judge_ranks_bad_answers_below_a_plain_one(kind: str, response: str):
    assert _score(ONE_FACT) > _score(response), kind
    assert _score(GOOD) > _score(response), kind


def test_off_topic_is_about_the_prompt_not_the_text():
    """The same good answer about cats is good for a cat prompt and bad for a dog prompt."""
    cats = "Cats are curious and independent. Most cats chase small toys."
    assert _score(cats, "Tell me about cats.") > _score(ONE_FACT, PROMPT) - 1.0
    assert _score(cats, "Tell me about cats.") > _score(cats, PROMPT) + 3.0


@pytest.mark.parametrize(
    "hack",
    [
        "Dogs are great great great.",
        "Dogs dogs dogs are wonderful great lovely amazing fun.",
        "I love dogs, they are great and wonderful and amazing and fun!",
        "Puppies and dogs are the best, so good, so nice, so fun, so amazing!",
        "Dogs puppies dog puppy love great wonderful lovely amazing best.",
        "Dogs are loyal friends loyal friends loyal friends, wonderful wonderful!",
    ],
)
def test_reward_hacks_score_below_a_plain_good_answer(hack: str):
    words = set(hack.lower().replace(",", " ").replace(".", " ").replace("!", " ").split())
    assert words & set(DOGS.keywords), "the hack mentions the topic"
    assert words & demo.POSITIVE, "the hack uses positive words"
    assert _score(GOOD) > _score(hack)


def test_gold_judge_is_deterministic_and_handles_empty():
    assert _score(GOOD) == _score(GOOD)
    assert _score("") < _score("The dog was")
    assert _score("   ...   ") < _score("The dog was")


def test_response_kinds_are_ordered_on_average():
    rng = random.Random(0)
    prompts = demo.make_prompts()
    means = {
        kind: statistics.mean(
            demo.gold_score(p, demo.respond(demo.topic_of(p), kind, rng))
            for p in prompts
            for _ in range(2)
        )
        for kind in demo.PAIR_KINDS
    }
    assert means["good"] > means["mediocre"] > means["unformed"], means
    for bad in ("short", "off_topic", "negative", "repetitive"):
        assert means["unformed"] > means[bad], (bad, means)
    assert means["good"] > means["rambling"], means


def test_respond_is_deterministic_for_a_seed():
    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [demo.respond(t, k, rng) for t in demo.TOPICS for k in demo.PAIR_KINDS]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_respond_rejects_unknown_kind():
    with pytest.raises(ValueError, match="brilliant"):
        demo.respond(DOGS, "brilliant", random.Random(0))


def test_every_prompt_has_a_topic():
    prompts = demo.make_prompts()
    assert (
        len(prompts)
        == len(set(prompts))
        == (len(demo.TOPICS) * len(demo.TEMPLATES) * len(demo.CONTEXTS))
    )
    for prompt in prompts:
        topic = demo.topic_of(prompt)
        assert topic is not None and topic.name in prompt


# -- generate() ---------------------------------------------------------------------------------


def test_generate_is_deterministic(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    stats_a = demo.generate(DemoConfig(), DataConfig(), root=a)
    stats_b = demo.generate(DemoConfig(), DataConfig(), root=b)
    files = _tree_bytes(a)
    assert len(files) == 6
    assert files == _tree_bytes(b)
    assert stats_a == stats_b


def test_generate_depends_on_the_seed(tmp_path: Path, demo_root: Path):
    demo.generate(DemoConfig(seed=DemoConfig().seed + 1), DataConfig(), root=tmp_path)
    ours, theirs = _tree_bytes(tmp_path), _tree_bytes(demo_root)
    assert ours.keys() == theirs.keys()
    assert ours["data/preferences/train.jsonl"] != theirs["data/preferences/train.jsonl"]


def test_generate_is_independent_of_pythonhashseed(tmp_path: Path, demo_root: Path):
    script = (
        "import sys; from pathlib import Path; from rlhf_tasks import demo; "
        "from rlhf_tasks.config import DataConfig, DemoConfig; "
        "demo.generate(DemoConfig(), DataConfig(), root=Path(sys.argv[1]))"
    )
    expected = _tree_bytes(demo_root)
    for seed in ("1", "4242"):
        out = tmp_path / f"hashseed-{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", script, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert _tree_bytes(out) == expected, f"PYTHONHASHSEED={seed} changed the demo data"


def test_generate_writes_where_data_config_says(tmp_path: Path):
    data = DataConfig(
        dir="d",
        preferences_train="d/p/t.jsonl",
        preferences_heldout="d/p/h.jsonl",
        sft_train="d/s.jsonl",
        prompts_rl="d/rl.jsonl",
        prompts_heldout="d/held.jsonl",
    )
    config = DemoConfig(n_sft=5, n_pairs_train=10, n_pairs_heldout=4)
    stats = demo.generate(config, data, root=tmp_path)
    assert sorted(_tree_bytes(tmp_path / "d")) == sorted(
        ["p/t.jsonl", "p/h.jsonl", "s.jsonl", "rl.jsonl", "held.jsonl", "stats.json"]
    )
    assert len(_rows(tmp_path / "d/s.jsonl")) == 5
    assert len(_rows(tmp_path / "d/p/t.jsonl")) == 10
    assert len(_rows(tmp_path / "d/p/h.jsonl")) == 4
    assert json.loads((tmp_path / "d/stats.json").read_text()) == stats


def test_row_counts_follow_the_config(demo_root: Path):
    config, data = DemoConfig(), DataConfig()
    assert len(_rows(demo_root / data.sft_train)) == config.n_sft
    assert len(_rows(demo_root / data.preferences_train)) == config.n_pairs_train
    assert len(_rows(demo_root / data.preferences_heldout)) == config.n_pairs_heldout


def test_train_and_heldout_prompts_are_disjoint(demo_root: Path):
    data = DataConfig()
    rl = {r["prompt"] for r in _rows(demo_root / data.prompts_rl)}
    heldout = {r["prompt"] for r in _rows(demo_root / data.prompts_heldout)}
    assert rl and heldout
    assert not rl & heldout
    assert rl | heldout == set(demo.make_prompts())
    assert len(heldout) == round(len(demo.make_prompts()) * DemoConfig().heldout_fraction)
    # Each data set draws only on its own side of the split.
    assert {r["prompt"] for r in _rows(demo_root / data.sft_train)} <= rl
    assert {r["prompt"] for r in _rows(demo_root / data.preferences_train)} <= rl
    assert {r["prompt"] for r in _rows(demo_root / data.preferences_heldout)} <= heldout


def test_stats_json_matches_the_returned_stats(tmp_path: Path, demo_root: Path):
    stats = demo.generate(DemoConfig(), DataConfig(), root=tmp_path)
    on_disk = json.loads((demo_root / "data" / "stats.json").read_text(encoding="utf-8"))
    assert on_disk == stats
    assert stats["seed"] == DemoConfig().seed
    assert stats["sft"]["rows"] == DemoConfig().n_sft


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_annotators_are_noisy_but_informative(demo_root: Path, split: str):
    stats = json.loads((demo_root / "data" / "stats.json").read_text(encoding="utf-8"))
    agreement = stats["preferences"][split]["agreement_with_gold"]
    assert 0.85 <= agreement <= 0.99
    # The reported agreement is the truth about the rows: chosen has the higher gold score.
    rows = _rows(demo_root / f"data/preferences/{split}.jsonl")
    agree = sum(
        demo.gold_score(r["prompt"], r["chosen"]) > demo.gold_score(r["prompt"], r["rejected"])
        for r in rows
    )
    assert agree / len(rows) == pytest.approx(agreement, abs=1e-4)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_label_is_not_just_length(demo_root: Path, split: str):
    rows = _rows(demo_root / f"data/preferences/{split}.jsonl")
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
    assert 0.3 <= longer <= 0.8, longer


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pairs_are_distinct_and_unique(demo_root: Path, split: str):
    rows = _rows(demo_root / f"data/preferences/{split}.jsonl")
    assert all(r["chosen"] != r["rejected"] for r in rows)
    keys = [(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in rows]
    assert len(keys) == len(set(keys)), "a pair appears twice (in either order)"
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["annotator"] for r in rows} <= set(demo.ANNOTATORS)
    assert {r["margin"] for r in rows} <= {0.0, 1.0, 2.0}
    assert all(
        set(r) == {"id", "prompt", "chosen", "rejected", "annotator", "margin"} for r in rows
    )


def test_sft_demonstrations_are_mostly_good(demo_root: Path):
    rows = _rows(demo_root / DataConfig().sft_train)
    assert all(set(r) == {"id", "prompt", "completion"} for r in rows)
    scores = [demo.gold_score(r["prompt"], r["completion"]) for r in rows]
    assert statistics.mean(scores) > 2.0
    assert all(r["completion"].strip() for r in rows)


# -- the tiny base model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(base_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model_dir))


def test_tokenizer_round_trips_demo_text(tokenizer, demo_root: Path):
    texts = demo.corpus()[:200]
    texts += [r["chosen"] for r in _rows(demo_root / DataConfig().preferences_heldout)][:200]
    texts += ["Tell me about dogs in winter.", "dogs are great great great", "  Two  spaces."]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_is_trained_on_the_demo_vocabulary(tokenizer):
    """A BPE trained on the demo corpus encodes demo text in far fewer tokens than bytes."""
    text = GOOD_FRIENDLY
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n_tokens < len(text.encode()) / 3


def test_tokenizer_special_tokens(tokenizer):
    for name in ("bos", "eos", "pad"):
        token = getattr(tokenizer, f"{name}_token")
        token_id = getattr(tokenizer, f"{name}_token_id")
        assert token, name
        assert token_id is not None, name
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer("Dogs are")["input_ids"][0] == tokenizer.bos_token_id


def test_tokenizer_max_length_is_from_params(tokenizer):
    assert tokenizer.model_max_length == load_params(PARAMS).base_model.max_length


def test_chat_template_renders_a_user_turn(tokenizer):
    messages = [{"role": "user", "content": "Tell me about dogs."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    assert "Tell me about dogs." in text
    assert text.startswith(tokenizer.bos_token)
    assert text.rstrip().endswith("Assistant:")
    with_answer = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": GOOD}], tokenize=False
    )
    assert GOOD in with_answer
    assert with_answer.endswith(tokenizer.eos_token)


def test_model_loads_with_automodel(base_model_dir: Path, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    params = load_params(PARAMS).base_model
    config = AutoConfig.from_pretrained(str(base_model_dir))
    assert config.num_hidden_layers == params.num_layers
    assert config.hidden_size == params.hidden_size
    assert config.num_attention_heads == params.num_heads
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir))
    assert model.config.num_hidden_layers == params.num_layers
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["Tell me about dogs.", "Dogs are"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_stage_base_model_follows_params_overrides(project: Path, rlhf):
    """`rlhf stage base_model -S ...` builds a model with the overridden sizes."""
    from transformers import AutoConfig, AutoTokenizer

    code, _, err = rlhf(
        "stage",
        "base_model",
        "-S",
        "model.name_or_path=artifacts/base_model",
        "-S",
        "base_model.num_layers=3",
        "-S",
        "base_model.max_length=64",
        "-S",
        "base_model.hidden_size=32",
        "-S",
        "base_model.num_heads=2",
    )
    assert code == 0, err
    out_dir = project / "artifacts" / "base_model"
    config = AutoConfig.from_pretrained(str(out_dir))
    assert config.num_hidden_layers == 3
    assert config.hidden_size == 32
    assert config.num_attention_heads == 2
    assert config.max_position_embeddings == 64
    assert AutoTokenizer.from_pretrained(str(out_dir)).model_max_length == 64
    assert (out_dir / "model.safetensors").is_file()
