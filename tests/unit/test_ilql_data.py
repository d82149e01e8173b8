import json

import pytest

from nemo_rlhf.data.ilql import DataError, ILQLDataset, load_jsonl_samples
from nemo_rlhf.data.tokenizers import CharTokenizer

TOK = CharTokenizer(list("abcd"))   # pad 0, eos 1, a..d = 2..5


def test_layout_by_hand():
    ds = ILQLDataset.build(["bca", ["b", "d"]], [1.0, 0.0], TOK, seq_length=6, normalization="none")
    # "bca" -> b c a <eos> = [3, 4, 2, 1]; states 0..3; actions at states 0..2 (c, a, eos)
    assert ds.tokens[0].tolist() == [3, 4, 2, 1, 0, 0]
    assert ds.labels[0].tolist() == [4, 2, 1, 0, 0, 0]
    assert ds.loss_mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert ds.rewards[0].tolist() == [0, 0, 1, 0, 0, 0]            # on the last action (EOS)
    assert ds.next_nonterminal[0].tolist()[:3] == [1, 1, 0]          # state after EOS is terminal
    # ["b", "d"] -> b d <eos>
    assert ds.loss_mask[1].tolist() == [1, 1, 0, 0, 0, 0]
    assert ds.next_nonterminal[1].tolist()[:2] == [1, 0]


def test_standard_normalisation():
    ds = ILQLDataset.build(["ba", "bca"], [1.0, 3.0], TOK, seq_length=5)
    # mean 2, std sqrt(2): -> -0.7071, +0.7071
    assert ds.rewards[0, 1].item() == pytest.approx(-0.70710, abs=1e-4)
    assert ds.rewards[1, 2].item() == pytest.approx(0.70710, abs=1e-4)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="2 samples but 1 rewards"):
        ILQLDataset.build(["ba", "bc"], [1.0], TOK, 5)
    with pytest.raises(DataError, match="sample 1: character 'z'"):
        ILQLDataset.build(["ba", "bz"], [1.0, 2.0], TOK, 5)
    with pytest.raises(DataError, match="sample 0 has 6 tokens, more than model.seq_length=4"):
        ILQLDataset.build(["bcdab"], [1.0], TOK, 4)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"sample": "ba", "reward": 1}) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl_samples(f)
    f.write_text(json.dumps({"sample": "ba"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: expected an object with 'sample' and 'reward'"):
        load_jsonl_samples(f)
    f.write_text(json.dumps({"sample": ["b", "a"], "reward": "high"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: 'reward' must be a finite number"):
        load_jsonl_samples(f)
    f.write_text(json.dumps({"sample": ["b", "a", "c"], "reward": 1}) + "\n")
    with pytest.raises(DataError, match=r"\[prompt, completion\] pair"):
        load_jsonl_samples(f)
    with pytest.raises(DataError, match="no such file"):
        load_jsonl_samples(tmp_path / "missing.jsonl")
    f.write_text(json.dumps({"sample": "ba", "reward": 0.5}) + "\n\n" + json.dumps({"sample": ["b", "ca"], "reward": 1}) + "\n")
    assert load_jsonl_samples(f) == (["ba", ["b", "ca"]], [0.5, 1.0])
