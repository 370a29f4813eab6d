"""Megatron-LM's pretrain_gpt.py with DenseMixer router gradients (``--moe-dense-router-grad``).

Runs Megatron-LM's own dataset provider and forward step; only the TransformerConfig class and
the layer spec (the default one or ``--spec``'s) change. Takes every pretrain_gpt.py argument
plus the ``--moe-dense-router-grad*`` flags (``--moe-densemixer*`` are aliases). Megatron-LM
with megatron-core 0.16 to 0.19, and main.

    MEGATRON_LM_PATH=/path/to/Megatron-LM torchrun --nproc-per-node 8 \\
        examples/pretrain_gpt_densemixer.py <pretrain_gpt.py arguments> \\
        --num-experts 64 --moe-router-topk 8 --moe-dense-router-grad
"""

import sys
import warnings

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        # megatron.core warns at import that Transformer Engine / Apex are absent; --help
        # needs neither.
        warnings.filterwarnings("ignore", category=UserWarning)
    from megatron_densemixer.integrations.megatron_lm import run_pretrain_gpt

    run_pretrain_gpt()
