from nemo_rlhf.checkpoint.dist_ckpt import (  # noqa: F401
    CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, read_meta, save_checkpoint,
)
