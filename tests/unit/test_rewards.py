import pytest

from nemo_rlhf.rewards import RewardFunctionError, resolve_reward_fn, score
from nemo_rlhf.tasks.randomwalks import RandomWalks
from tests.helpers import rewards as R

S = ["bca", "bda", "bcda", "bxx", "ba"]
P = [s[0] for s in S]
C = [s[1:] for s in S]


def test_resolve_builtin_module_function_and_callable():
    task = RandomWalks()
    assert resolve_reward_fn("randomwalks", task) == task.reward_fn
    assert resolve_reward_fn("tests.helpers.rewards:length_reward") is R.length_reward
    assert resolve_reward_fn(R.wrong_length) is R.wrong_length
    with pytest.raises(RewardFunctionError, match="cannot be imported"):
        resolve_reward_fn("tests.helpers.rewards:nope")
    with pytest.raises(RewardFunctionError, match="package.module:function"):
        resolve_reward_fn("no_colon")


def test_score_passes_samples_prompts_completions():
    assert score(R.length_reward, S, P, C) == [2.0, 2.0, 3.0, 2.0, 1.0]


def test_raising_reward_names_function_and_sample():
    with pytest.raises(RewardFunctionError, match=r"raises_on_goal raised ValueError: cannot score .* on sample 0 \('bca'\)"):
        score(R.raises_on_goal, S, P, C)


def test_wrong_length_and_nan_are_named():
    with pytest.raises(RewardFunctionError, match="wrong_length returned 4 scores for 5 samples"):
        score(R.wrong_length, S, P, C)
    with pytest.raises(RewardFunctionError, match=r"returns_nan returned nan for sample 3 \('bxx'\)"):
        score(R.returns_nan, S, P, C)


def test_randomwalks_reward_is_optimality():
    task = RandomWalks()
    walk = task.walks[0]
    text = task.walk_text(walk)
    assert task.reward_fn([text])[0] == pytest.approx(task.walk_optimality(walk))
    assert task.reward_fn(["", "?"]) == [0.0, 0.0]


def test_weighted_reward_functions_sum_and_each_is_kept_and_checked():
    from nemo_rlhf.rewards import weighted_rewards

    task = RandomWalks()
    fn = weighted_rewards(["randomwalks", "tests.helpers.rewards:length_reward"], [1.0, 0.5], task)
    samples = [task.walk_text(w) for w in task.walks[:3]]
    prompts, completions = [s[:1] for s in samples], [s[1:] for s in samples]
    out = score(fn, samples, prompts, completions)
    opt = task.reward_fn(samples, prompts=prompts, completions=completions)
    length = R.length_reward(samples, prompts, completions)
    assert out == pytest.approx([a + 0.5 * b for a, b in zip(opt, length)])
    assert fn.last == {"randomwalks": pytest.approx(opt), "length_reward": pytest.approx(length)}
    bad = weighted_rewards(["randomwalks", "tests.helpers.rewards:returns_nan"], [], task)
    with pytest.raises(RewardFunctionError, match="reward function returns_nan returned nan"):
        bad(samples * 2, prompts * 2, completions * 2)
    with pytest.raises(RewardFunctionError, match="ppo.reward_weights has 1 weights for 2 ppo.reward_fns"):
        weighted_rewards(["randomwalks", "tests.helpers.rewards:length_reward"], [1.0], task)
