# GPU image: NGC PyTorch (carries CUDA torch, Transformer Engine, apex, NCCL) + nemo_rlhf.
#   docker build -t nemo_rlhf .
#   docker run --gpus all --rm -v $PWD/runs:/workspace/runs nemo_rlhf \
#       torchrun --standalone --nproc-per-node 8 -m nemo_rlhf.train --config-name sft_tiny parallel=tp2
# NGC images ship Python 3.12, so megatron-core resolves to the newest release our range allows.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}
WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY nemo_rlhf ./nemo_rlhf
COPY conf ./conf
COPY launchers ./launchers
COPY scripts ./scripts
# Keep the container's own torch / TE / apex: install our package without resolving torch.
RUN pip install --no-cache-dir --no-deps -e . && \
    pip install --no-cache-dir "megatron-core>=0.16.1,<0.20" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" \
        "pytorch-lightning>=2.6,<2.7" "sentencepiece>=0.2,<0.3" psutil tqdm tensorboard
ENV NEMO_RLHF_VERBOSITY=INFO
CMD ["python", "-m", "nemo_rlhf.train", "--config-name", "sft_tiny"]
