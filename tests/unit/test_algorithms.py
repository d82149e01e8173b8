import pytest
import torch

from nemo_rlhf.algorithms.reductions import (INITIAL_MOMENTS, Moments, combine_moments, masked_mean, masked_sum,
                                             masked_sums, masked_var, mean_var_from_sums, moments, moments_std,
                                             update_moments)
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


def test_masked_sums_by_hand_and_they_add_over_shards():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    sums = masked_sums(x, m)
    # valid 1, 2, 3, 4: count 4, sum 10, sum of squares 1 + 4 + 9 + 16 = 30
    assert sums.dtype == torch.float64 and sums.tolist() == [4.0, 10.0, 30.0]
    assert (masked_sums(x[:1], m[:1]) + masked_sums(x[1:], m[1:])).tolist() == [4.0, 10.0, 30.0]
    mean, var = mean_var_from_sums(sums)
    # mean 2.5, unbiased var (30 / 4 - 6.25) * 4 / 3 = 5 / 3 ; population var 1.25
    assert mean.item() == 2.5 and var.item() == pytest.approx(5 / 3)
    assert mean_var_from_sums(sums, unbiased=False)[1].item() == pytest.approx(1.25)
    # nothing valid: mean 0, var 0 (no division by zero)
    assert [t.item() for t in mean_var_from_sums(masked_sums(x, torch.zeros_like(m)))] == [0.0, 0.0]


def test_chan_combine_equals_the_moments_of_the_concatenation():
    # [1, 2, 3]: n 3, mean 2, var 2/3 ; [4, 10]: n 2, mean 7, var 9
    # union [1, 2, 3, 4, 10]: mean 4, var (9 + 4 + 1 + 0 + 36) / 5 = 10
    a, b = moments(torch.tensor([1.0, 2.0, 3.0])), moments(torch.tensor([4.0, 10.0]))
    assert a == pytest.approx(Moments(3.0, 2.0, 2 / 3)) and b == Moments(2.0, 7.0, 9.0)
    both = combine_moments(a, b)
    assert both == pytest.approx(Moments(5.0, 4.0, 10.0))
    assert combine_moments(b, a) == pytest.approx(both)
    g = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(37, generator=g)
    parts = [x[:5], x[5:6], x[6:30], x[30:]]
    total = moments(parts[0])
    for p in parts[1:]:
        total = combine_moments(total, moments(p))
    assert total == pytest.approx(moments(x), rel=1e-6)
    assert moments(torch.tensor([5.0])) == Moments(1.0, 5.0, 0.0)
    assert combine_moments(a, moments(torch.zeros(0))) == a


def test_running_moments_start_as_trlx_and_follow_the_batches():
    assert INITIAL_MOMENTS == Moments(count=1e-8, mean=0.0, var=1.0) and moments_std(INITIAL_MOMENTS) == 1.0
    state = update_moments(INITIAL_MOMENTS, moments(torch.tensor([1.0, 2.0, 3.0])))
    # the prior's count 1e-8 is negligible: the first batch takes over
    assert state == pytest.approx(Moments(3.0, 2.0, 2 / 3), rel=1e-6)
    state = update_moments(state, moments(torch.tensor([4.0, 10.0])))
    assert state == pytest.approx(Moments(5.0, 4.0, 10.0), rel=1e-6)
    assert moments_std(state) == pytest.approx(10 ** 0.5, rel=1e-6)
    assert moments_std(Moments(4.0, 1.0, 0.0)) == pytest.approx(1e-4)      # never 0
