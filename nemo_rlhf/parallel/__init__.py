"""Process groups, megatron parallel_state, data-parallel reductions, the CPU compatibility layer
and the Lightning strategy."""
from nemo_rlhf.parallel.distributed import (  # noqa: F401
    LaunchEnv, barrier, broadcast_object, destroy, detect_launch_env, init_distributed,
    initialize_model_parallel, is_rank_zero, validate_layout,
)
from nemo_rlhf.parallel.reductions import (  # noqa: F401
    all_gather_lists, all_reduce_sum, data_parallel_group, dp_masked_sums, dp_moments, dp_whiten,
)
