"""PPO with ragged (left-padded) prompts: the training forwards treat the padding exactly as
generation does. Checked against the sampler's own log-probs (GPT and T5), and a whole PPO
experience + update pass on a ragged batch against the same rows run per prompt-length group."""
import pytest
import torch

from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
from nemo_rlhf.generation.sampling import SamplingParams, generate, left_pad
from nemo_rlhf.modules.engine import lm_forward, lm_forward_with_states, shift_rows
from nemo_rlhf.modules.rollouts import PromptDataset, trim_left_padding

PROMPTS = [[5, 6], [7, 8, 9, 10], [4], [7, 8, 9, 10, 11]]
VOCAB = 20


def _experience_layout(out):
    """tokens -> (inputs, labels, completion mask) as PPOModule.make_experience builds them."""
    tokens = out.tokens
    p = out.prompt_length
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.float32)
    mask[:, p - 1:] = out.mask
    return inputs, labels, mask


def test_shift_rows_and_trim_left_padding_by_hand():
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert shift_rows(x, torch.tensor([1, -2])).tolist() == [[0, 1, 2, 3], [7, 8, 0, 0]]
    ds = PromptDataset(PROMPTS, pad_id=0)
    assert ds.ids.shape == (4, 5) and ds.lengths.tolist() == [2, 4, 1, 5]
    ids, pad = trim_left_padding(ds.ids[[0, 2]], ds.lengths[[0, 2]])    # this batch's longest prompt is 2
    assert ids.tolist() == [[5, 6], [0, 4]] and pad.tolist() == [0, 1]
    with pytest.raises(ValueError, match="non-empty prompts"):
        PromptDataset([[3], []], pad_id=0)


@pytest.fixture
def gpt(mp):
    from nemo_rlhf.models.gpt import build_gpt_chunks
    from nemo_rlhf.models.heads import attach_value_head

    torch.manual_seed(0)
    model = build_gpt_chunks(ModelConfig(seq_length=24), ParallelConfig(), vocab_size=VOCAB)[0]
    head = attach_value_head(model, model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    return model.eval()


@pytest.fixture
def t5(mp):
    from nemo_rlhf.models.heads import attach_value_head
    from nemo_rlhf.models.t5 import build_t5_chunks

    torch.manual_seed(0)
    cfg = ModelConfig(arch="t5", num_layers=2, encoder_num_layers=1, hidden_size=32, num_attention_heads=4,
                      ffn_hidden_size=64, seq_length=16)
    model = build_t5_chunks(cfg, ParallelConfig(), vocab_size=VOCAB)[0]
    head = attach_value_head(model, cfg.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt", "t5"])
def test_training_forward_logprobs_equal_the_samplers_on_ragged_prompts(arch, request):
    from nemo_rlhf.models.heads import value_head_output

    model = request.getfixturevalue(arch)
    ids, lengths = left_pad(PROMPTS, pad_id=0)
    pad = ids.shape[1] - lengths
    # vocab_size=None: the sampler's log-probs cover the whole (padded) vocabulary, as the training NLL
    out = generate(model, ids, SamplingParams(max_new_tokens=6, eos_id=1, pad_id=0),
                   generator=torch.Generator().manual_seed(11), prompt_lengths=lengths)
    inputs, labels, mask = _experience_layout(out)
    p = out.prompt_length
    with torch.no_grad():
        nll, states = lm_forward_with_states(model, inputs, labels, mask, pad)
        logprobs, values = -nll * mask, value_head_output(model, states) * mask
    got, want = logprobs[:, p - 1:], out.logprobs * out.mask
    assert float(out.mask.sum()) > 8
    assert (got - want).abs().max() < 1e-6, (got, want)             # measured 4.8e-7 (GPT and T5)
    # the padding is what makes the difference: ignoring it gives other log-probs
    with torch.no_grad():
        leaky = -lm_forward(model, inputs, labels, mask) * mask
    assert (leaky[:, p - 1:] - want).abs().max() > 1e-3
    # each row alone (no padding at all) has the same log-probs and values
    for i in range(len(PROMPTS)):
        k = int(pad[i])
        with torch.no_grad():
            nll, states = lm_forward_with_states(model, inputs[i:i + 1, k:], labels[i:i + 1, k:], mask[i:i + 1, k:])
            alone, alone_values = -nll * mask[i:i + 1, k:], value_head_output(model, states) * mask[i:i + 1, k:]
        assert (alone[0] - logprobs[i, k:]).abs().max() < 1e-5, i
        assert (alone_values[0] - values[i, k:]).abs().max() < 1e-5, i
        assert float(logprobs[i, :k].abs().sum()) == 0.0 and float(values[i, :k].abs().sum()) == 0.0


@pytest.fixture
def ppo_module(mp, tmp_path):
    from nemo_rlhf.api import default_ppo_config
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.modules.ppo import PPOModule
    from nemo_rlhf.modules.run_dir import RunDirectory
    from nemo_rlhf.tasks.randomwalks import RandomWalks

    cfg = default_ppo_config("ppo.whiten_advantages=false", "ppo.num_rollouts=8", "trainer.micro_batch_size=2",
                             "ppo.num_minibatches=1", "ppo.ppo_epochs=1", "trainer.max_steps=1",
                             "task.num_walks=50", "ppo.init_kl_coef=0.1")
    t = cfg.task
    task = RandomWalks(t.num_nodes, t.edge_prob, t.max_length, t.num_walks, t.seed)
    tok = CharTokenizer(task.vocab)
    torch.manual_seed(0)
    # prompts: the first 1..3 nodes of walks (the goal 'a' not among them)
    walks = [w for w in task.walks if len(w) > 3][:8]
    prompts = [tok.encode(task.walk_text(w[:1 + i % 3])) for i, w in enumerate(walks)]
    module = PPOModule(cfg, prompts, tok, task.reward_fn, RunDirectory(tmp_path), None, dp_rank=0, dp_size=1)
    return module, prompts


def _grads(engine):
    return [p.main_grad.detach().clone() for p in engine.module.parameters() if p.requires_grad]


def test_a_ppo_pass_on_ragged_prompts_equals_one_pass_per_prompt_length(ppo_module):
    """Experience (log-probs, reference log-probs, values, KL-shaped rewards, GAE) and the actor and
    critic losses and gradients of a ragged batch equal those of its prompt-length groups, each run
    without any padding: nothing of the padding leaks into a number PPO uses."""
    from functools import partial

    from nemo_rlhf.modules.critics import critic_forward
    from nemo_rlhf.modules.ppo import actor_forward

    module, prompts = ppo_module
    ds = module.prompts
    ids, pad = trim_left_padding(ds.ids, ds.lengths)
    assert sorted(set(pad.tolist())) == [0, 1, 2]
    tokens, gen_mask = module.generate_rollouts(ids, pad)
    scores = module.score(tokens, ids.shape[1], pad)
    texts = [module.tokenizer.decode(t[k:].tolist()) for t, k in zip(tokens, pad.tolist())]
    assert scores.tolist() == pytest.approx(module.reward_fn(texts))
    # the reward function gets each prompt without its padding (even from a decoder that keeps pads)
    seen, tok, reward_fn = {}, module.tokenizer, module.reward_fn

    class KeepsSpecials:
        def decode(self, ids):
            return tok.decode(ids, skip_special_tokens=False)

    def spy(samples, prompts=None, completions=None):
        seen["prompts"] = prompts
        return [0.0] * len(samples)

    module.tokenizer, module.reward_fn = KeepsSpecials(), spy
    module.score(tokens, ids.shape[1], pad)
    module.tokenizer, module.reward_fn = tok, reward_fn
    assert seen["prompts"] == [tok.decode(p) for p in prompts]
    # ppo.critic=separate: its engine is checkpointed under the name old runs resume from
    assert list(module.engines_for_checkpoint()) == ["critic", "reference"]
    full = module.make_experience(tokens, gen_mask, scores, pad)
    assert float(full.loss_mask.sum()) > 10

    def pass_stats(rollout, pack=False):
        batch = {k: v for k, v in rollout.as_dict().items() if k != "scores"}
        mbs = batch["tokens"].shape[0]
        out = {}
        for name, engine, step in (("actor", module.actor, partial(actor_forward, ppo=module.ppo, with_value=False,
                                                                   pack=pack)),
                                   ("critic", module.critic.engine, partial(critic_forward, ppo=module.ppo, pack=pack))):
            stats = engine.forward_backward(batch, mbs, step)
            out[name] = (stats["loss"], stats["num_tokens"], _grads(engine))
        return out

    full_stats = pass_stats(full)
    # data.packing: the ragged rows packed (each from its first real token) give the same update
    for name, (loss, n, grads) in pass_stats(full, pack=True).items():
        assert n == full_stats[name][1] and loss == pytest.approx(full_stats[name][0], rel=1e-5, abs=1e-6), name
        for a, b in zip(grads, full_stats[name][2]):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), name
    groups = {}
    for i, k in enumerate(pad.tolist()):
        groups.setdefault(k, []).append(i)
    sums = {"actor": [0.0, 0.0, None], "critic": [0.0, 0.0, None]}
    for k, rows in groups.items():
        idx = torch.tensor(rows)
        part = module.make_experience(tokens[idx, k:], gen_mask[idx], scores[idx])      # no padding at all
        assert int(part.pad.abs().sum()) == 0
        for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns", "loss_mask"):
            a, b = getattr(full, name)[idx, k:], getattr(part, name)
            assert (a - b).abs().max() < 1e-5, (name, k)
            assert float(getattr(full, name)[idx, :k].abs().sum()) == 0.0, name
        for name, (loss, n, grads) in pass_stats(part).items():
            s = sums[name]
            s[0] += loss * n
            s[1] += n
            s[2] = [g * n for g in grads] if s[2] is None else [a + g * n for a, g in zip(s[2], grads)]
    for name, (loss, n, grads) in full_stats.items():
        total, count, gsum = sums[name]
        assert count == n
        assert loss == pytest.approx(total / count, rel=1e-5, abs=1e-6), name
        for g_full, g_parts in zip(grads, gsum):
            assert torch.allclose(g_full, g_parts / count, atol=1e-6, rtol=1e-4), name
    assert any(float(g.abs().sum()) > 0 for g in full_stats["actor"][2])


def test_prompt_file_schema_and_overlong_policies(tmp_path):
    import json

    from nemo_rlhf.config.schema import DataConfig
    from nemo_rlhf.data.files import SCHEMA_OF_ALGORITHM, load_examples
    from nemo_rlhf.data.ilql import DataError
    from nemo_rlhf.data.tokenizers import CharTokenizer

    tok = CharTokenizer(list("abcdefgh"))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "ab"}, {"prompt": "abcdefg"}, {"prompt": "c"}]))
    assert SCHEMA_OF_ALGORITHM["ppo"] == "prompt"
    load = lambda overlong: load_examples(DataConfig(train_file=str(path), overlong=overlong), "prompt", tok,
                                          seq_length=10, max_new_tokens=5)   # room for 5 prompt tokens
    with pytest.raises(DataError, match="row 2: prompt of 7 tokens, more than model.seq_length - "
                                        "generation.max_new_tokens = 5"):
        load("error")
    out, report = load("truncate")
    assert out == [tok.encode("ab"), tok.encode("cdefg"), tok.encode("c")] and report.truncated == 1
    out, report = load("drop")
    assert out == [tok.encode("ab"), tok.encode("c")] and report.as_dict() == {"examples": 2, "truncated": 0,
                                                                               "dropped": 1}
    path.write_text(json.dumps({"text": "ab"}) + "\n")
    with pytest.raises(DataError, match="missing field"):
        load("error")
    with pytest.raises(DataError, match="leaves no room for a prompt"):
        load_examples(DataConfig(train_file=str(path)), "prompt", tok, seq_length=10, max_new_tokens=10)


def test_api_prompts_of_any_length_are_encoded_and_checked():
    from nemo_rlhf.config.schema import ConfigError
    from nemo_rlhf.data.tokenizers import CharTokenizer
    from nemo_rlhf.recipes.common import encode_prompts

    tok = CharTokenizer(list("abcdefgh"))
    assert encode_prompts(tok, ["b", "cde"], max_tokens=3) == [tok.encode("b"), tok.encode("cde")]
    with pytest.raises(ConfigError, match=r"prompts\[1\] has 4 tokens, more than model.seq_length - "
                                          r"generation.max_new_tokens = 3"):
        encode_prompts(tok, ["b", "cdef"], max_tokens=3)
    with pytest.raises(ConfigError, match=r"eval_prompts\[0\] must be a non-empty string"):
        encode_prompts(tok, [""], name="eval_prompts")
    with pytest.raises(ConfigError, match="non-empty list"):
        encode_prompts(tok, "abc")
