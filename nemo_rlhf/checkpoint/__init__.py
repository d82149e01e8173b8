from nemo_rlhf.checkpoint.dist_ckpt import (  # noqa: F401
    CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, load_own_weights, read_meta,
    save_checkpoint,
)

# Transitional: nemo_rlhf's own checkpoints only. A model.path that may be a Hugging Face directory,
# a .nemo file or a NeMo 2 / Megatron checkpoint loads through nemo_rlhf.weights.load_weights;
# delete this alias once train.py / recipes/ import that instead.
load_weights = load_own_weights
