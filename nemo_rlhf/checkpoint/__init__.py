"""nemo_rlhf's own checkpoints (megatron dist_checkpointing): save, load, resume. Foreign formats
(Hugging Face, NeMo) load through nemo_rlhf.weights, which sits above this package and interop/."""
from nemo_rlhf.checkpoint.dist_ckpt import (  # noqa: F401
    CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, load_own_weights, read_meta,
    save_checkpoint,
)

