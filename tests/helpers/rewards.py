"""Reward functions used by tests (named in configs as tests.helpers.rewards:<name>)."""
import math

CALLS = {"n": 0}


def length_reward(samples, prompts, completions):
    return [float(len(c)) for c in completions]


def raises_on_goal(samples, prompts, completions):
    """Raises as soon as a sample reaches the goal node 'a' (per-sample, so the index is findable)."""
    for s in samples:
        if "a" in s[1:]:
            raise ValueError("cannot score walks that reach the goal")
    return [0.0] * len(samples)


def wrong_length(samples, prompts, completions):
    return [0.0] * (len(samples) - 1)


def returns_nan(samples, prompts, completions):
    return [math.nan if i == 3 else 0.0 for i in range(len(samples))]


def fails_on_third_call(samples, prompts, completions):
    CALLS["n"] += 1
    if CALLS["n"] >= 3:
        raise RuntimeError("reward server went away")
    return [0.0] * len(samples)
