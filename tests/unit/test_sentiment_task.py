"""The sentiment task's pure parts (nemo_rlhf/tasks/sentiment.py, text_corpus.py): the corpus read
from the installed package, the book-level held-out split, the BPE tokenizer, VADER rewards and the
DPO summary pairs."""
import re

import pytest

from nemo_rlhf.config.schema import ConfigError, TaskConfig
from nemo_rlhf.tasks import build_task
from nemo_rlhf.tasks.sentiment import Sentiment, vader_compound, vader_reward
from nemo_rlhf.tasks.text_corpus import first_sentence, first_words, read_verses, split_books


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NEMO_RLHF_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield Sentiment(max_passage_tokens=96, summary_verses=2, num_eval_pairs=32)
    finally:
        mp.undo()


def test_vader_rewards_follow_the_lexicon():
    assert vader_compound("good") > 0.3 and vader_compound("love and joy") > 0.5
    assert vader_compound("terrible") < -0.3 and vader_compound("death and sorrow") < -0.5
    assert vader_compound("") == 0.0 and vader_compound("the table") == 0.0
    # the completion is scored, not the prompt; without completions, the whole sample
    assert vader_reward(["terrible good"], prompts=["terrible"], completions=[" good"]) == [vader_compound(" good")]
    assert vader_reward(["terrible"]) == [vader_compound("terrible")]


def test_corpus_comes_from_the_package_and_splits_by_whole_books():
    verses = read_verses()
    assert len(verses) > 20000 and verses[0].text == "In the beginning God created the heavens and the earth."
    assert not any(re.search(r"\d+:\d+", v.text) for v in verses)                      # verse numbers stripped
    train, held = split_books(verses, 0.1, seed=1000)
    assert len(held) == 7 and not set(train) & set(held) and len(train) + len(held) == 66
    assert split_books(verses, 0.1, seed=1000) == (train, held)                # a function of the seed
    assert split_books(verses, 0.1, seed=7)[1] != held
    with pytest.raises(ConfigError, match="heldout_fraction"):
        split_books(verses, 1.5, seed=1)


def test_text_helpers():
    assert first_words("And God said, Let there be light", 3) == ("And God said,", " Let there be light")
    assert first_words("Jesus wept.", 4) == ("Jesus wept.", "")
    assert first_sentence("He came. He saw.") == "He came." and first_sentence("no end") == "no end"


def test_held_out_text_is_disjoint_from_training(task):
    held, train = set(task.heldout_books), set(task.train_books)
    assert held and not held & train
    train_texts = {v.text for v in task.train_verses}
    assert all(t not in train_texts for t in task.eval_texts + task.eval_passages)
    assert set(task.sft_texts) <= train_texts
    prompts = set(task.prompts())
    assert all(task.split(t)[0] in prompts for t in task.sft_texts[:50])
    passages = {p for p, _, _ in task.text_pairs(task.train_verses, 1)}
    assert not passages & {p for p, _, _ in task.eval_pairs}


def test_tokenizer_is_trained_on_the_text_and_joins_prompt_and_completion(task):
    tok = task.tokenizer()
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 2000)
    for prompt, completion in task.sft_samples()[:200]:
        ids = tok.encode(prompt) + tok.encode(completion)
        assert tok.decode(tok.encode(prompt)) + tok.decode(tok.encode(completion)) == prompt + completion
        assert len(ids) + 1 <= task.max_passage_tokens
    # common words are single tokens: a tokenizer of this text, not of bytes
    assert len(tok.encode(" LORD")) == 1 and len(tok.encode(" God")) == 1


def test_preference_pairs_prefer_the_passages_own_first_sentence(task):
    tok = task.tokenizer()
    pairs = task.preference_pairs(tok, 64, seed=3)
    assert len(pairs) == 64
    for prompt, chosen, rejected in pairs:
        assert chosen[-1] == tok.eos_id and rejected[-1] == tok.eos_id and chosen != rejected
        passage, summary = tok.decode(prompt), tok.decode(chosen)
        assert passage.startswith(summary.strip()) and len(prompt) + max(len(chosen), len(rejected)) <= 96
    assert task.preference_pairs(tok, 64, seed=3) == pairs


def test_task_config_and_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_RLHF_CACHE", str(tmp_path))
    tc = TaskConfig(name="sentiment", max_length=24, prompt_words=4, max_passage_tokens=48)
    assert tc.sequence_length() == 48
    with pytest.raises(ConfigError, match="task.corpus"):
        build_task(TaskConfig(name="sentiment", corpus="austen"))
    with pytest.raises(ConfigError, match="vocab_size"):
        build_task(TaskConfig(name="sentiment", vocab_size=100))
