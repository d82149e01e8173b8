"""Process groups, megatron parallel_state, the CPU compatibility layer and the Lightning strategy."""
from nemo_rlhf.parallel.distributed import (  # noqa: F401
    LaunchEnv, barrier, broadcast_object, destroy, detect_launch_env, init_distributed,
    initialize_model_parallel, is_rank_zero, validate_layout,
)
