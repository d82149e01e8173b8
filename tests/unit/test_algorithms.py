import pytest
import torch

from nemo_rlhf.algorithms.reductions import masked_mean, masked_sum, masked_var
from nemo_rlhf.algorithms.sft import sft_loss


def test_masked_reductions_ignore_padding_even_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, m).item() == 11.0
    assert masked_mean(x, m).item() == pytest.approx(11.0 / 4)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(x, m, denominator=10.0).item() == pytest.approx(1.1)
    # var of [1, 2, 3, 5]: mean 2.75, sum sq dev 8.75, unbiased / 3
    assert masked_var(x, m).item() == pytest.approx(8.75 / 3)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(8.75 / 4)


def test_masked_mean_all_masked_is_zero_not_nan():
    assert masked_mean(torch.ones(3), torch.zeros(3)).item() == 0.0


def test_sft_loss_by_hand():
    nll = torch.tensor([[0.5, 1.0, 9.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, n = sft_loss(nll, mask)
    assert total.item() == pytest.approx(3.5) and n.item() == 3


def test_sft_loss_split_invariance():
    # sum over micro-batches / global count == one big batch mean (what calculate_per_token_loss does)
    g = torch.Generator().manual_seed(0)
    nll = torch.rand(8, 5, generator=g)
    mask = (torch.rand(8, 5, generator=g) > 0.3).float()
    whole = sft_loss(nll, mask)
    parts = [sft_loss(nll[i:i + 2], mask[i:i + 2]) for i in range(0, 8, 2)]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert total.item() == pytest.approx((whole[0] / whole[1]).item(), rel=1e-6)


def test_sft_loss_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        sft_loss(torch.zeros(2, 3), torch.zeros(2, 4))
