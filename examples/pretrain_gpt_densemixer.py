"""Megatron-LM's pretrain_gpt.py with DenseMixer router gradients (``--moe-densemixer``).

Runs Megatron-LM's own dataset provider and forward step; only the TransformerConfig class and
the layer spec (the default one or ``--spec``'s) change. Takes every pretrain_gpt.py argument
plus the ``--moe-densemixer*`` flags. Megatron-LM 0.15 to 0.19 and main.

    MEGATRON_LM_PATH=/path/to/Megatron-LM torchrun --nproc-per-node 8 \\
        examples/pretrain_gpt_densemixer.py <pretrain_gpt.py arguments> \\
        --num-experts 64 --moe-router-topk 8 --moe-densemixer
"""

from megatron_densemixer.integrations.megatron_lm import run_pretrain_gpt

if __name__ == "__main__":
    run_pretrain_gpt()
