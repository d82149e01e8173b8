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
# Keep the container's own torch / TE / apex: install our package without resolving torch, then
# every other dependency listed in pyproject.toml (read from it, so the two never drift apart).
RUN pip install --no-cache-dir --no-deps -e . && \
    python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not re.match(r'torch\b', d)))" > /tmp/requirements.txt && \
    pip install --no-cache-dir -r /tmp/requirements.txt
ENV NEMO_RLHF_VERBOSITY=INFO
CMD ["python", "-m", "nemo_rlhf.train", "--config-name", "sft_tiny"]
