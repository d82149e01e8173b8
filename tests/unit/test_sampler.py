from nemo_rlhf.data.sampler import GlobalBatchSampler


def test_dp_ranks_partition_each_global_batch():
    a = list(GlobalBatchSampler(10, 4, 0, 2, seed=1, start_step=0, end_step=6))
    b = list(GlobalBatchSampler(10, 4, 1, 2, seed=1, start_step=0, end_step=6))
    full = list(GlobalBatchSampler(10, 4, 0, 1, seed=1, start_step=0, end_step=6))
    assert [x + y for x, y in zip(a, b)] == full


def test_epochs_cover_all_samples_then_reshuffle():
    s = GlobalBatchSampler(12, 4, 0, 1, seed=1, start_step=0, end_step=6)
    batches = list(s)
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
    assert first != second


def test_resume_continues_the_same_stream():
    whole = list(GlobalBatchSampler(10, 4, 0, 1, seed=3, start_step=0, end_step=8))
    resumed = list(GlobalBatchSampler(10, 4, 0, 1, seed=3, start_step=5, end_step=8))
    assert resumed == whole[5:]
    assert len(GlobalBatchSampler(10, 4, 0, 1, seed=3, start_step=5, end_step=8)) == 3
