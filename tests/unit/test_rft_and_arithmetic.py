"""Rejection fine-tuning's threshold math, dynamic sampling's batch assembly and the arithmetic
task, against values worked out by hand in the comments."""
import pytest
import torch

from nemo_rlhf.algorithms.rft import accepted, rejection_thresholds, rising_percentile
from nemo_rlhf.config.schema import TaskConfig
from nemo_rlhf.errors import ConfigError
from nemo_rlhf.modules.rollouts import concat_rollouts
from nemo_rlhf.tasks import build_task, offline_data_task
from nemo_rlhf.tasks.arithmetic import Arithmetic


def test_percentile_rises_linearly_then_stays():
    # 0.5 -> 0.9 over 5 iterations: steps of 0.1, then 0.9 for good
    assert [rising_percentile(i, 0.5, 0.9, 5) for i in range(7)] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9])
    assert rising_percentile(0, 0.5, 0.9, 1) == 0.9


def test_thresholds_are_per_prompt_quantiles_with_a_floor():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # group 0: the 0.5 quantile of 0, 1, 2, 3 (linear interpolation) is 1.5; group 1: of 0, 0, 0, 1 is 0
    t = rejection_thresholds(scores, groups, 0.5)
    assert t.tolist() == [1.5] * 4 + [0.0] * 4
    assert accepted(scores, t).tolist() == [False, False, True, True, True, True, True, True]
    # with a 0/1-style floor of 0.5 the failures of group 1 are not kept
    t = rejection_thresholds(scores, groups, 0.5, min_reward=0.5)
    assert accepted(scores, t).tolist() == [False, False, True, True, False, False, False, True]
    # the 0.75 quantile of 0, 1, 2, 3 is 2.25: only the 3 is kept
    assert accepted(scores[:4], rejection_thresholds(scores[:4], groups[:4], 0.75)).tolist() == [False] * 3 + [True]


def test_concat_rollouts_aligns_prompts_left_and_generations_right():
    # part A: prompt width 1, 2 generated; part B: prompt width 2 (first row padded by 1), 1 generated
    a = (torch.tensor([[5, 6, 7]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    b = (torch.tensor([[0, 8, 9], [3, 4, 9]]), torch.tensor([[1.0], [1.0]]), torch.tensor([1, 0]))
    tokens, mask, pad = concat_rollouts([a, b], pad_id=0)
    assert tokens.tolist() == [[0, 5, 6, 7], [0, 8, 9, 0], [3, 4, 9, 0]]
    assert mask.tolist() == [[1, 1], [1, 0], [1, 0]]
    assert pad.tolist() == [1, 1, 0]


def test_arithmetic_problems_answers_and_reward():
    task = Arithmetic(max_operand=50, operators="+-", num_sft=30, num_prompts=40, num_eval=20, seed=3)
    # fixed widths: operands 2 digits, answers 2 digits (49 + 49 = 98) after a '-' when negative
    assert task.question((7, "+", 45)) == "07+45=" and task.answer((7, "+", 45)) == "52"
    assert task.answer((7, "-", 45)) == "-38" and task.answer((45, "-", 45)) == "00"
    assert task.max_length == 4 and task.prompt_length == 6
    assert task.reward_fn(["07+45=52", "07+45=53", "07+45=052", "07-45=-38", "07-45=38", "garbage", "07+45="]) \
        == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # the SFT examples are right by the reward
    assert task.reward_fn([p + c for p, c in task.sft_samples()]) == [1.0] * 30


def test_arithmetic_splits_are_disjoint_and_seeded():
    task = Arithmetic(max_operand=20, operators="+", num_sft=100, num_prompts=200, num_eval=50, seed=1)
    ev, sft, pr = set(task.eval_problems), set(task.sft_problems), set(task.prompt_problems)
    assert (len(ev), len(sft), len(pr)) == (50, 100, 200)
    assert not ev & sft and not ev & pr and not sft & pr
    other = Arithmetic(max_operand=20, operators="+", num_sft=100, num_prompts=200, num_eval=50, seed=2)
    assert set(other.eval_problems) != ev
    assert Arithmetic(max_operand=20, operators="+", num_sft=100, num_prompts=200, num_eval=50,
                      seed=1).eval_problems == task.eval_problems


def test_arithmetic_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="only 100 distinct problems"):
        build_task(TaskConfig(name="arithmetic", max_operand=10, operators="+", num_sft=50, num_prompts=50,
                              num_eval=10))
    with pytest.raises(ConfigError, match="operators"):
        build_task(TaskConfig(name="arithmetic", operators="+/"))
    with pytest.raises(ValueError, match="task.max_length=3 is too short"):
        TaskConfig(name="arithmetic", operators="+-", max_length=3)
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        TaskConfig(name="sudoku")
    with pytest.raises(ConfigError, match="no start node reaches the goal 'a' in fewer than task.max_length=2"):
        build_task(TaskConfig(max_length=2))     # randomwalks: nothing to evaluate (was an unpack error in generation)
    task = build_task(TaskConfig(name="arithmetic", max_length=4))
    with pytest.raises(ConfigError, match="task.name=arithmetic builds no data for algorithm.name=dpo"):
        offline_data_task(task, "dpo")
