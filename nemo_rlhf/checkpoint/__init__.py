from nemo_rlhf.checkpoint.dist_ckpt import (  # noqa: F401
    CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, load_weights, read_meta, save_checkpoint,
)
