"""Memory and layout planning (pure math in memory.py; the CLI is nemo_rlhf.plan)."""
