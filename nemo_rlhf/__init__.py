"""nemo_rlhf: Megatron-scale RLHF (SFT, PPO, ...) with Hydra + Lightning on megatron-core."""
__version__ = "0.1.0"


def __getattr__(name):
    # lazy: importing nemo_rlhf must not import torch/megatron
    if name in ("train", "default_ppo_config", "default_sft_config", "default_ilql_config", "default_grpo_config",
                "default_rloo_config", "default_rft_config", "Trainer"):
        from nemo_rlhf import api

        return getattr(api, name)
    raise AttributeError(name)
