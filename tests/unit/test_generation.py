import pytest
import torch

from nemo_rlhf.config.schema import ModelConfig, ParallelConfig
from nemo_rlhf.generation.sampling import SamplingParams, filter_logits, generate


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out[0, [0, 3]]).all() and out[0, 1] == 3.0 and out[0, 2] == 2.0


def test_top_p_keeps_the_smallest_nucleus():
    # probs 0.5, 0.3, 0.2: top_p=0.6 keeps the first two (0.5 < 0.6, then 0.8 >= 0.6), drops 0.2
    logits = torch.log(torch.tensor([[0.3, 0.5, 0.2]]))
    out = filter_logits(logits, top_p=0.6)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2])
    # top_p=0.5 keeps only the most likely token
    out = filter_logits(logits, top_p=0.5)
    assert torch.isfinite(out[0]).tolist() == [False, True, False]


@pytest.fixture
def model(mp):
    from nemo_rlhf.models.gpt import build_gpt_chunks

    torch.manual_seed(0)
    m = build_gpt_chunks(ModelConfig(seq_length=24), ParallelConfig(), vocab_size=20)[0]
    return m


def test_kv_cache_greedy_equals_no_cache(model):
    prompts = torch.randint(2, 20, (3, 4), generator=torch.Generator().manual_seed(1))
    a = generate(model, prompts, SamplingParams(max_new_tokens=12, greedy=True), vocab_size=20)
    b = generate(model, prompts, SamplingParams(max_new_tokens=12, greedy=True, use_kv_cache=False), vocab_size=20)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert (a.tokens[:, 4:] < 20).all()          # never samples the padded vocabulary tail


def test_sampling_is_seeded_and_stops_at_eos(model):
    prompts = torch.full((16, 1), 3)
    p = SamplingParams(max_new_tokens=10, eos_id=1, pad_id=0)
    a = generate(model, prompts, p, generator=torch.Generator().manual_seed(5), vocab_size=20)
    b = generate(model, prompts, p, generator=torch.Generator().manual_seed(5), vocab_size=20)
    assert torch.equal(a.tokens, b.tokens)
    comp = a.completions
    for i in range(16):
        n = int(a.mask[i].sum())
        ids = comp[i].tolist()
        if 1 in ids:                              # EOS: masked through it, pad after it
            e = ids.index(1)
            assert n == e + 1 and all(t == 0 for t in ids[e + 1:])
        else:
            assert n == 10
    # logprobs are log-probabilities of the chosen tokens under the T=1 distribution
    assert (a.logprobs <= 0).all() and (a.logprobs[a.mask == 0] == 0).all()


def test_logprobs_match_a_full_forward(model):
    prompts = torch.full((2, 2), 4)
    out = generate(model, prompts, SamplingParams(max_new_tokens=5), generator=torch.Generator().manual_seed(0),
                   vocab_size=20)
    toks = out.tokens
    with torch.no_grad():
        logits = model(toks, torch.arange(toks.shape[1]).expand_as(toks), None)[:, :, :20]
    lp = torch.log_softmax(logits.float(), -1)
    # logits at position t predict token t + 1: generated tokens 2..6 come from positions 1..5
    ref = lp[:, 1:-1].gather(-1, toks[:, 2:, None]).squeeze(-1)
    assert torch.allclose(out.logprobs, ref, atol=1e-5)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_left_padded_prompts_generate_as_if_alone(model, use_kv_cache):
    from nemo_rlhf.generation.sampling import left_pad

    short, long = [5, 6], [7, 8, 9, 10]
    padded, lengths = left_pad([short, long], pad_id=0)
    assert padded.tolist() == [[0, 0, 5, 6], [7, 8, 9, 10]]
    p = SamplingParams(max_new_tokens=6, greedy=True, use_kv_cache=use_kv_cache)
    both = generate(model, padded, p, vocab_size=20, prompt_lengths=lengths)
    alone = generate(model, torch.tensor([short]), p, vocab_size=20)
    assert both.completions[0].tolist() == alone.completions[0].tolist()
    assert torch.allclose(both.logprobs[0], alone.logprobs[0], atol=1e-5)
    alone_long = generate(model, torch.tensor([long]), p, vocab_size=20)
    assert both.completions[1].tolist() == alone_long.completions[0].tolist()


def test_stop_strings(model):
    decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)
    free = generate(model, torch.full((1, 2), 4), SamplingParams(max_new_tokens=8, greedy=True), vocab_size=20)
    first = decode(free.completions[0, 1:2].tolist())
    out = generate(model, torch.full((1, 2), 4), SamplingParams(max_new_tokens=8, greedy=True, stop_strings=(first,)),
                   vocab_size=20, decode=decode)
    expected = decode(free.completions[0].tolist()).index(first) + 1    # stops at its first occurrence
    assert int(out.mask[0].sum()) == expected <= 2
    assert out.completions[0, :expected].tolist() == free.completions[0, :expected].tolist()


def test_right_padded_prompts_equal_left_padded(model):
    from nemo_rlhf.generation.sampling import left_pad

    left, lengths = left_pad([[5, 6], [7, 8, 9, 10]], pad_id=0)
    right = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]])
    p = SamplingParams(max_new_tokens=5, greedy=True)
    a = generate(model, left, p, vocab_size=20, prompt_lengths=lengths)
    b = generate(model, right, p, vocab_size=20, prompt_lengths=lengths, padding_side="right")
    assert torch.equal(a.tokens, b.tokens)
