"""Sequence packing (data/sft.py ``SFTDataset.packed``): several examples per row with their own
positions and attention. One SFT step on the packed rows gives the loss and the gradients of the
same examples unpacked."""
import math

import pytest
import torch

from nemo_rlhf.config.schema import ModelConfig, OptimConfig, ParallelConfig
from nemo_rlhf.data.sft import SFTDataset
from nemo_rlhf.data.tokenizers import CharTokenizer
from nemo_rlhf.modules.engine import MegatronEngine, lm_forward_step
from nemo_rlhf.modules.forward_only import packed_attention
from nemo_rlhf.modules.sft import sft_loss_func
from nemo_rlhf.tasks.randomwalks import RandomWalks


def _pairs(n=24):
    task = RandomWalks()
    tok = CharTokenizer(task.vocab)
    walks = [task.walk_text(w) for w in task.walks[:n]]
    return [(tok.encode(w[:1]), tok.encode(w[1:]) + [tok.eos_id]) for w in walks], tok


def test_packed_rows_hold_every_example_once_with_its_own_positions():
    pairs, tok = _pairs()
    plain = SFTDataset.from_pairs(pairs, 32, tok.pad_id, tok.eos_id, add_eos=False)
    packed = SFTDataset.packed(pairs, 32, tok.pad_id, tok.eos_id, add_eos=False)
    assert len(packed) < len(plain) / 2                                   # walks of <= 11 tokens, rows of 32
    assert packed.segment_ids.max(1).values.sum() == len(pairs)           # every example, once
    assert packed.loss_mask.sum() == plain.loss_mask.sum()
    # the multiset of (input, label, counted) triples is the same: no label crosses two examples
    triples = lambda d: sorted((int(t), int(l)) for t, l, m in zip(d.tokens.flatten(), d.labels.flatten(),
                                                                    d.loss_mask.flatten()) if m)
    assert triples(packed) == triples(plain)
    mask, pos = packed_attention(torch.tensor([[1, 1, 1, 2, 2, 0]]))
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    blocked = mask[0, 0]
    assert not blocked[4, 3] and blocked[3, 2] and blocked[1, 2] and blocked[4, 1]   # inside only, causal


def test_one_sft_step_on_packed_rows_equals_the_unpacked_step(mp):
    pairs, tok = _pairs(16)
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32)
    plain = SFTDataset.from_pairs(pairs, 32, tok.pad_id, tok.eos_id, add_eos=False)
    packed = SFTDataset.packed(pairs, 32, tok.pad_id, tok.eos_id, add_eos=False)
    results = []
    for data in (plain, packed):
        torch.manual_seed(0)
        engine = MegatronEngine(model, ParallelConfig(), OptimConfig(), tok.vocab_size, max_steps=2)
        batch = {k: v for k, v in data[list(range(len(data)))].items()}
        rows = len(data)
        stats = engine.forward_backward(batch, rows, lambda b, m: lm_forward_step(b, m, sft_loss_func))
        grads = torch.cat([p.main_grad.flatten() for p in engine.module.parameters()])
        results.append((stats, grads, engine.module.state_dict()))
    (s1, g1, _), (s2, g2, _) = results
    assert s1["num_tokens"] == s2["num_tokens"] > 0
    assert abs(s1["loss"] - s2["loss"]) < 1e-6, (s1["loss"], s2["loss"])
    assert float((g1 - g2).abs().max()) < 1e-6 and float(g1.norm()) > 1e-2
    # fewer positions computed: 5 rows x 32 against 16 rows trimmed to the longest walk (11)
    assert s2["model_tokens"] < s1["model_tokens"]


# -- packing at forward time (modules/packing.py): DPO and KTO micro-batches ---------------------------
def test_pack_rows_puts_every_span_in_once_and_unpack_puts_it_back():
    from nemo_rlhf.modules.packing import pack_rows, spans

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (6, 10), generator=g)
    mask = torch.zeros(6, 10)
    for i, (a, b) in enumerate([(2, 9), (1, 3), (4, 6), (0, 0), (3, 10), (1, 2)]):
        mask[i, a:b] = 1
    pad = torch.tensor([0, 0, 2, 0, 1, 0])       # left padding: a span starts at the first real token
    starts, ends = spans(mask, pad)
    assert starts.tolist() == [0, 0, 2, 0, 1, 0] and ends.tolist() == [9, 3, 6, 0, 10, 2]   # row 3: empty
    rows = pack_rows(tokens, tokens + 100, starts, ends)
    # spans of 9, 3, 4, 9, 2 positions: rows of 9 (9 | 9 | 4 3 2) compute 27 positions; of 14
    # (9 4 | 9 3 2) 28, of 12 or 18 36
    assert rows.tokens.shape == (3, 9)
    assert pack_rows(tokens, None, starts, ends, multiple=2).tokens.shape == (2, 14)   # 3 x 10 = 30 > 28
    assert set(rows.segments.unique().tolist()) - {0} == {1, 2, 3, 4, 5}          # the empty row left out
    back = rows.unpack(rows.tokens)
    inside = torch.zeros(6, 10, dtype=torch.bool)
    for i in range(6):
        inside[i, starts[i]:ends[i]] = True
    assert torch.equal(back[inside], tokens[inside]) and not back[~inside].any()
    assert torch.equal(rows.unpack(rows.labels)[inside], (tokens + 100)[inside])


def test_rows_wider_than_the_position_table_give_padding_position_zero(mp):
    """A packed row may be up to twice the longest span wide, wider than a learned position table of
    model.seq_length rows; its padding tail takes position 0 (the reward model's packed run once
    stopped on 'index out of range' here), and each span's own positions and NLL are unchanged."""
    from nemo_rlhf.models.gpt import build_gpt_chunks, gpt_forward
    from nemo_rlhf.modules.packing import pack_rows

    _, positions = packed_attention(torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0, 0, 0]]))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0, 0, 0]]
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8, transformer_impl="local")
    torch.manual_seed(0)
    model = build_gpt_chunks(cfg, ParallelConfig(), 20)[0].eval()
    tokens = torch.randint(1, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    rows = pack_rows(tokens, tokens, torch.tensor([0, 0]), torch.tensor([8, 3]), width=16)   # 11 of 16 used
    mask, pos = packed_attention(rows.segments)
    with torch.no_grad():
        packed = rows.unpack(gpt_forward(model, rows.tokens, pos, mask, labels=rows.labels)[0])
        whole = gpt_forward(model, tokens, torch.arange(8).expand(2, 8), None, labels=tokens)[0]
    assert rows.tokens.shape == (1, 16) and int(pos.max()) == 7
    assert float((packed[0] - whole[0]).abs().max()) < 1e-5 and float((packed[1, :3] - whole[1, :3]).abs().max()) < 1e-5


def _dpo_step(model_cfg, pack, kto=False, reference="model"):
    from nemo_rlhf.data.preference import KTODataset, PreferenceDataset, randomwalk_pairs, unpair
    from nemo_rlhf.modules.dpo import FORWARD_BACKWARD
    from nemo_rlhf.recipes.dpo import DPOConfig
    from nemo_rlhf.recipes.kto import KTOConfig

    task = RandomWalks(seed=1000)
    tok = CharTokenizer(task.vocab)
    pairs = randomwalk_pairs(task, tok, 8, seed=0)
    if kto:
        ds = KTODataset.build_unpaired(unpair(pairs), model_cfg.seq_length, tok.pad_id, tok.eos_id, seed=0)
    else:
        ds = PreferenceDataset.build(pairs, model_cfg.seq_length, tok.pad_id, tok.eos_id)
    batch = {"tokens": ds.tokens, "labels": ds.labels, "loss_mask": ds.loss_mask, "ref_logps": ds.ref_logps}
    if kto:
        batch["desirable"] = ds.desirable
    torch.manual_seed(0)
    engine = MegatronEngine(model_cfg, ParallelConfig(), OptimConfig(), tok.vocab_size, max_steps=2)
    torch.manual_seed(1)
    ref = MegatronEngine(model_cfg, ParallelConfig(), OptimConfig(), tok.vocab_size, max_steps=2).module.eval()
    cfg = KTOConfig() if kto else DPOConfig()
    stats = FORWARD_BACKWARD["kto" if kto else "dpo"](engine, batch, len(ds) // 2, cfg, ref, pack=pack)
    grads = torch.cat([p.main_grad.flatten() for p in engine.module.parameters()])
    return stats, grads


@pytest.mark.parametrize("kind", ["dpo_learned_positions", "dpo_rope", "kto_rope"])
def test_a_packed_dpo_or_kto_step_equals_the_unpacked_step(mp, kind):
    """Chosen and rejected sequences (KTO: completions and mismatched ones) of each micro-batch packed
    for the policy and the reference-model forwards: the loss, rewards and gradients of the unpacked
    step (different weights for the reference, so its log-probs matter), with fewer positions."""
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                        position_embedding_type="learned_absolute" if "learned" in kind else "rope")
    kto = kind.startswith("kto")
    (s1, g1), (s2, g2) = _dpo_step(model, False, kto), _dpo_step(model, True, kto)
    for k in s1:
        if k != "model_tokens":
            assert abs(s1[k] - s2[k]) < 1e-5, (k, s1[k], s2[k])
    assert float((g1 - g2).abs().max()) < 1e-6 and float(g1.norm()) > 1e-3
    assert s2["model_tokens"] < s1["model_tokens"]       # the throughput logs count the packed positions
    if not kto:
        assert abs(s1["loss"] - math.log(2)) > 1e-3        # the reference model's log-probs are not the policy's
