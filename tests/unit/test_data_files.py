"""Training data from JSONL / parquet files (nemo_rlhf.data.files) and the KTO data layout."""
import json

import pytest
import torch

from nemo_rlhf.algorithms.dpo import kto_kl_estimate
from nemo_rlhf.config.schema import ConfigError, DataConfig
from nemo_rlhf.data.files import DataError, fit_length, load_examples
from nemo_rlhf.data.preference import KTODataset, PreferenceDataset, unpair
from nemo_rlhf.data.sft import SFTDataset
from nemo_rlhf.data.tokenizers import CharTokenizer

TOK = CharTokenizer(list("abcd"))   # pad 0, eos 1, a..d = 2..5
EOS = 1


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _load(path, schema, seq_length=6, **kw):
    return load_examples(DataConfig(train_file=str(path), **kw), schema, TOK, seq_length)


PREF = [{"prompt": "a", "chosen": "bc", "rejected": "dd"}, {"prompt": "b", "chosen": "a", "rejected": "cab"}]


@pytest.mark.parametrize("writer", [_jsonl, _parquet], ids=["jsonl", "parquet"])
def test_preference_file_gives_the_same_tensors_as_in_memory_pairs(tmp_path, writer):
    path = writer(tmp_path / ("p.jsonl" if writer is _jsonl else "p.parquet"), PREF)
    examples, report = _load(path, "preference")
    assert examples == [([2], [3, 4, EOS], [5, 5, EOS]), ([3], [2, EOS], [4, 2, 3, EOS])]
    assert report.as_dict() == {"examples": 2, "truncated": 0, "dropped": 0}
    from_file = PreferenceDataset.build(examples, 6, TOK.pad_id, EOS, add_eos=False)
    in_memory = PreferenceDataset.build([([2], [3, 4], [5, 5]), ([3], [2], [4, 2, 3])], 6, TOK.pad_id, EOS)
    for key in ("tokens", "labels", "loss_mask"):
        assert torch.equal(getattr(from_file, key), getattr(in_memory, key))
    # chosen of pair 0: a b c <eos> -> labels b c <eos>, loss on all three
    assert from_file.tokens[0, 0].tolist() == [2, 3, 4, 1, 0, 0]
    assert from_file.loss_mask[0, 0].tolist() == [1, 1, 1, 0, 0, 0]


def test_sft_and_kto_schemas_and_custom_keys(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"q": "a", "a": "bcd"}, {"q": "dd", "a": "c"}])
    examples, _ = _load(path, "sft", prompt_key="q", completion_key="a")
    assert examples == [([2], [3, 4, 5, EOS]), ([5, 5], [4, EOS])]
    ds = SFTDataset.from_pairs(examples, 6, TOK.pad_id, EOS, add_eos=False)
    assert ds.loss_mask[1].tolist() == [0, 1, 1, 0, 0, 0]           # d d | c <eos>

    path = _jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                         {"prompt": "b", "completion": "cc", "label": 0}])
    examples, _ = _load(path, "kto")
    assert examples == [([2], [3, EOS], True), ([3], [4, 4, EOS], False)]


@pytest.mark.parametrize("content,schema,message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', "preference", ":2: not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}\n', "preference", "missing field(s) ['rejected']; the file has"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "sft", "row 2: field 'completion' is missing or null"),
    ('{"prompt": "a", "completion": 3}\n', "sft", "row 1: field 'completion' must be a string"),
    ('{"prompt": "a", "completion": "b", "label": "yes"}\n', "kto", "row 1: field 'label' must be true/false"),
    ('{"prompt": "a", "completion": "bz"}\n', "sft", "row 1: character 'z' is not in the tokenizer's vocabulary"),
    ('{"prompt": "", "completion": "b"}\n', "sft", "row 1: empty prompt"),
    ('{"prompt": "a", "completion": ""}\n', "sft", "row 1: empty completion"),
    ("", "sft", "the file is empty"),
])
def test_bad_files_name_the_problem(tmp_path, content, schema, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        _load(path, schema)
    assert message in str(e.value) and str(path) in str(e.value)


def test_missing_file_unknown_extension_and_config_values(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        _load(tmp_path / "nope.jsonl", "sft")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="set data.format=json or parquet"):
        _load(tmp_path / "data.txt", "sft")
    with pytest.raises(ConfigError, match="data.overlong must be error|truncate|drop"):
        DataConfig(overlong="cut")


def test_overlong_examples_error_truncate_or_drop(tmp_path):
    rows = [{"prompt": "a", "completion": "bcd"},          # 1 + 3 + EOS = 5 tokens: fits budget 5
            {"prompt": "ab", "completion": "cdcd"},        # 2 + 4 + 1 = 7 > 5
            {"prompt": "abcdab", "completion": "c"}]       # prompt alone longer than the budget
    path = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2: 7 tokens \(prompt 2 \+ completion 4 \+ EOS\), more than "
                                        r"model.seq_length \+ 1 = 5"):
        _load(path, "sft", seq_length=4)
    examples, report = _load(path, "sft", seq_length=4, overlong="truncate")
    assert report.as_dict() == {"examples": 3, "truncated": 2, "dropped": 0}
    assert examples[0] == ([2], [3, 4, 5, EOS])
    assert examples[1] == ([2, 3], [4, 5, 4])                    # cut completion, no EOS
    assert examples[2] == ([4, 5, 2, 3], [4])                    # prompt keeps its end
    assert all(len(p) + len(c) <= 5 for p, c in examples)
    examples, report = _load(path, "sft", seq_length=4, overlong="drop")
    assert report.as_dict() == {"examples": 1, "truncated": 0, "dropped": 2} and report.dropped_rows == [2, 3]
    path = _jsonl(tmp_path / "all_long.jsonl", rows[1:])
    with pytest.raises(DataError, match="all 2 examples were dropped"):
        _load(path, "sft", seq_length=4, overlong="drop")


def test_fit_length_shares_the_prompt_between_chosen_and_rejected():
    prompt, (chosen, rejected), cut = fit_length([2, 3], [[4], [5, 5, 5, 5]], EOS, 5, "truncate", "x")
    assert cut and prompt == [2, 3] and chosen == [4, EOS] and rejected == [5, 5, 5]


def test_kto_dataset_pairs_each_prompt_with_another_completion():
    examples = unpair([([2], [3, 4], [5]), ([3], [2], [4, 4, 4])])
    assert [e[2] for e in examples] == [True, False, True, False]
    ds = KTODataset.build_unpaired(examples, 6, TOK.pad_id, EOS, seed=0)
    assert ds.desirable.tolist() == [1.0, 0.0, 1.0, 0.0]
    for i, (prompt, completion, _) in enumerate(examples):
        row = ds.tokens[i]
        assert row[0, :len(prompt) + len(completion) + 1].tolist() == prompt + completion + [EOS]
        kl = row[1].tolist()
        assert kl[:len(prompt)] == prompt
        n = int(ds.loss_mask[i, 1].sum())
        others = [c for j, (_, c, _) in enumerate(examples) if j != i]
        assert kl[len(prompt):len(prompt) + n] in [c + [EOS] for c in others]
    assert set(ds[0].keys()) == {"tokens", "labels", "loss_mask", "ref_logps", "desirable"}
    with pytest.raises(ValueError, match="at least 2 examples"):
        KTODataset.build_unpaired(examples[:1], 6, TOK.pad_id, EOS, seed=0)


def test_kto_kl_estimate_by_hand():
    # log-ratios 1 and -2: mean -0.5 -> clamped to 0
    assert kto_kl_estimate(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])).item() == 0.0
    # log-ratios 1 and 2: mean 1.5
    policy = torch.tensor([-1.0, -1.0], requires_grad=True)
    z0 = kto_kl_estimate(policy, torch.tensor([-2.0, -3.0]))
    assert z0.item() == pytest.approx(1.5) and not z0.requires_grad
