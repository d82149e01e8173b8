"""Sequence packing (data/sft.py ``SFTDataset.packed``): several examples per row with their own
positions and attention. One SFT step on the packed rows gives the loss and the gradients of the
same examples unpacked."""
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
