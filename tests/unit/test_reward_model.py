import torch

from nemo_rlhf.checkpoint import save_checkpoint
from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
from nemo_rlhf.data.tokenizers import CharTokenizer
from nemo_rlhf.models.gpt import build_gpt_chunks, gpt_forward
from nemo_rlhf.models.heads import DecoderStates, attach_ilql_heads, attach_value_head, ilql_heads_output, \
    value_head_output
from nemo_rlhf.rewards import RewardModelScorer, score


def test_reward_model_scores_the_last_token(mp, tmp_path):
    tok = CharTokenizer(list("abcdef"))
    cfg = ModelConfig()
    torch.manual_seed(0)
    rm = build_gpt_chunks(cfg, ParallelConfig(), tok.vocab_size)[0].eval()
    attach_value_head(rm, cfg.hidden_size)
    torch.nn.init.normal_(rm.value_head.linear.weight, std=1.0)
    path = save_checkpoint(tmp_path, 1, [rm])
    scorer = RewardModelScorer(path, cfg, ParallelConfig(), tok)
    samples = ["abc", "b", "fedcba"]
    got = score(scorer, samples, [s[0] for s in samples], [s[1:] for s in samples])
    with torch.no_grad():
        for s, g in zip(samples, got):
            ids = torch.tensor([tok.encode(s)])
            _, hidden = gpt_forward(rm, ids, torch.arange(ids.shape[1])[None], None)
            assert abs(value_head_output(rm, DecoderStates(hidden))[0, -1].item() - g) < 1e-5
    assert len({round(g, 4) for g in got}) == 3


def test_gpt_forward_is_megatrons_forward_exactly(mp):
    """The heads read the hidden states of gpt_forward, which runs GPTModel's own stages: its
    logits and per-token loss equal megatron's call bit for bit (a megatron-core upgrade that
    changes the stages fails here), and its hidden states are the final-layernorm output."""
    from nemo_rlhf.generation.sampling import padded_attention

    torch.manual_seed(0)
    cfg = ModelConfig()
    gpt = build_gpt_chunks(cfg, ParallelConfig(), 20)[0].eval()
    tokens = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, 1)
    mask, pos = padded_attention(torch.tensor([0, 2, 1]), 7)
    with torch.no_grad():
        for positions, attention in ((torch.arange(7).expand(3, 7), None), (pos, mask)):
            logits, hidden = gpt_forward(gpt, tokens, positions, attention)
            assert torch.equal(logits, gpt(tokens, positions, attention))
            nll, _ = gpt_forward(gpt, tokens, positions, attention, labels=labels)
            assert torch.equal(nll, gpt(tokens, positions, attention, labels=labels))
            assert hidden.shape == (7, 3, cfg.hidden_size)
            weight = gpt.shared_embedding_or_output_weight()                  # [V, H]
            assert torch.allclose(logits, (hidden @ weight.t()).transpose(0, 1), atol=1e-5)


def test_heads_are_submodules_fed_explicitly_no_hooks_no_state(mp):
    """Heads hang off the GPTModel (checkpoint keys value_head.* / ilql_heads.*), the decoder has no
    hook, and a head reads whichever forward's states it is given, in any order."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    gpt = build_gpt_chunks(cfg, ParallelConfig(), 20)[0].eval()
    torch.nn.init.normal_(attach_value_head(gpt, cfg.hidden_size).linear.weight)
    attach_ilql_heads(gpt, two_qs=True)
    assert not gpt.decoder._forward_hooks and not gpt._forward_hooks
    keys = set(gpt.state_dict())
    assert {"value_head.linear.weight", "value_head.linear.bias", "ilql_heads.q_heads.1.weight",
            "ilql_heads.target_q_heads.0.bias", "ilql_heads.v_head.weight"} <= keys
    a, b = torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7, 8]])
    pos = torch.arange(3)[None]
    with torch.no_grad():
        _, ha = gpt_forward(gpt, a, pos, None)
        _, hb = gpt_forward(gpt, b, pos, None)
        va, vb = value_head_output(gpt, DecoderStates(ha)), value_head_output(gpt, DecoderStates(hb))
        _, ha_again = gpt_forward(gpt, a, pos, None)
        assert torch.equal(value_head_output(gpt, DecoderStates(ha_again)), va) and not torch.equal(va, vb)
        qs, target_qs, v = ilql_heads_output(gpt, DecoderStates(ha))
    assert len(qs) == len(target_qs) == 2 and qs[0].shape == (1, 3, gpt.vocab_size) and v.shape == (1, 3)
    assert torch.equal(qs[0], target_qs[0])                   # target copies start equal
