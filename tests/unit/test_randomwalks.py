from collections import deque

import numpy as np
import pytest

from nemo_rlhf.tasks.randomwalks import GOAL, RandomWalks, node_name


@pytest.fixture(scope="module")
def task():
    return RandomWalks()


def test_graph_invariants(task):
    adj = task.adj
    assert adj.shape == (21, 21)
    assert adj[GOAL].tolist() == [True] + [False] * 20          # goal is absorbing
    assert not any(adj[i, i] for i in range(1, 21))             # no self-loops elsewhere
    assert adj[1:].any(axis=1).all()                            # every node has an out-edge


def test_same_seed_same_task_other_seed_other_graph():
    a, b, c = RandomWalks(seed=3), RandomWalks(seed=3), RandomWalks(seed=4)
    assert (a.adj == b.adj).all() and a.walks == b.walks
    assert not (a.adj == c.adj).all()


def test_config_keys_change_the_task():
    t = RandomWalks(num_nodes=8, edge_prob=0.4, max_length=6, num_walks=50, seed=2)
    assert t.adj.shape == (8, 8) and len(t.walks) == 50
    assert all(1 <= len(w) <= 6 for w in t.walks)
    assert all(w[0] != GOAL for w in t.walks)
    # a walk stops at the goal
    assert all(GOAL not in w[:-1] for w in t.walks)
    assert all(all(t.adj[a, b] for a, b in zip(w, w[1:])) for w in t.walks)


def test_shortest_lengths_match_bfs(task):
    for s in range(task.num_nodes):
        seen, q = {s: 1}, deque([s])
        while q:
            v = q.popleft()
            for u in np.nonzero(task.adj[v])[0]:
                if int(u) not in seen:
                    seen[int(u)] = seen[v] + 1
                    q.append(int(u))
        expected = min(seen.get(GOAL, task.max_length), task.max_length)
        assert task.shortest[s] == expected


def _graph():
    # a -> a (goal), b -> c, c -> a, b -> d, d -> c ; max_length 4
    t = RandomWalks(num_nodes=4, edge_prob=0.5, max_length=4, num_walks=1, seed=0)
    adj = np.zeros((4, 4), dtype=bool)
    adj[0, 0] = adj[1, 2] = adj[2, 0] = adj[1, 3] = adj[3, 2] = True
    adj[3, 1] = True
    t.adj = adj
    t.shortest = t._shortest_lengths()
    return t


def test_scoring_by_hand():
    t = _graph()
    assert t.shortest == {0: 1, 1: 3, 2: 2, 3: 3}
    # b c a <eos>: shortest possible from b -> optimality (4 - 3) / (4 - 3) = 1
    s = t.score(1, list("ca"), ended_with_eos=True)
    assert (s.length, s.optimality, s.valid) == (3, 1.0, True)
    # b d c a: length 4 = max_length -> optimality 0, still valid
    s = t.score(1, list("dca"), ended_with_eos=True)
    assert (s.length, s.optimality, s.valid) == (4, 0.0, True)
    # junk after the goal: optimality only looks up to the goal, valid says no
    s = t.score(1, list("cab"), ended_with_eos=True)
    assert (s.optimality, s.valid) == (1.0, False)
    # goal reached but no EOS (cut off): invalid
    assert not t.score(1, list("ca"), ended_with_eos=False).valid
    # invalid edge b -> a
    s = t.score(1, list("a"), ended_with_eos=True)
    assert (s.length, s.optimality, s.valid) == (4, 0.0, False)
    # unknown token
    assert not t.score(1, ["<pad>"], ended_with_eos=False).valid
    # early EOS before the goal and before max_length
    s = t.score(1, list("d"), ended_with_eos=True)
    assert (s.length, s.valid) == (4, False)
    # never reaching the goal in max_length nodes: valid, optimality 0
    s = t.score(1, list("dbd"), ended_with_eos=True)
    assert (s.length, s.optimality, s.valid) == (4, 0.0, True)
    # from c (shortest 2): c a -> (4 - 2) / (4 - 2) = 1 ; from d: d c a -> (4-3)/(4-3) = 1
    assert t.score(2, list("a"), True).optimality == 1.0


def test_summarize_and_eval_starts(task):
    starts = task.eval_starts
    assert starts and all(task.shortest[s] < task.max_length for s in starts)
    scores = [task.score(w[0], [node_name(i) for i in w[1:]], True) for w in task.walks]
    m = task.summarize(scores)
    assert m["valid_rate"] == 1.0          # the training walks themselves are valid
    # random walks are far from optimal (shared/DESIGN.md measured 0.335 on the default graph)
    assert 0.25 < task.behaviour_optimality() < 0.45


def test_reward_model_held_out_walks_are_disjoint_and_equal_length_pairs_hinge_on_an_edge(task):
    from nemo_rlhf.data.preference import invalid_edge_pairs, randomwalk_pairs, split_walks
    from nemo_rlhf.data.tokenizers import CharTokenizer

    tok = CharTokenizer(task.vocab)
    train, held = split_walks(task.walks, 0.1, seed=0)
    assert len(train) + len(held) == len(task.walks) and held
    assert not {tuple(w) for w in train} & {tuple(w) for w in held}          # disjoint by walk identity
    walk_texts = lambda walks: {task.walk_text(w) for w in walks}
    for p, c, r in randomwalk_pairs(task, tok, 50, seed=1, walks=held):
        for completion in (c, r):
            assert tok.decode(p + completion) in walk_texts(held)           # only held-out walks
    for p, c, r in invalid_edge_pairs(task, tok, held, 50, seed=2):
        assert len(c) == len(r)                                              # length cannot decide
        chosen, rejected = tok.decode(p + c), tok.decode(p + r)
        assert chosen in walk_texts(held)
        diff = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        assert len(diff) == 1 and 0 < diff[0] < len(chosen) - 1              # one interior node replaced
        assert task.reward_fn([rejected]) == [0.0]                          # an invalid edge scores 0
        assert task.reward_fn([chosen])[0] > 0
