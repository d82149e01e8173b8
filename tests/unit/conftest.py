import pytest


@pytest.fixture(scope="session")
def dist1():
    """A 1-rank gloo process group (megatron needs one) with the CPU compatibility layer."""
    from nemo_rlhf.parallel import init_distributed

    return init_distributed()


@pytest.fixture
def mp(dist1):
    """megatron parallel_state at TP=PP=DP=1."""
    from nemo_rlhf.config.schema import ParallelConfig
    from nemo_rlhf.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1)
    yield
