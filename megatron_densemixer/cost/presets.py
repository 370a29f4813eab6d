"""Devices and published MoE training layouts for the cluster cost model.

Every figure names its source. Device figures are datasheet peaks; bytes are decimal (1 GB/s
= 1e9 B/s), as the datasheets give them.
"""

from __future__ import annotations

from typing import NamedTuple

from megatron_densemixer.cost import MoELayerShape
from megatron_densemixer.cost.cluster import Device

DEVICES = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 Tensor Core 1,979 TFLOPS
    # "with sparsity", so 989 TFLOPS dense; NVLink 900 GB/s (both directions together, so
    # 450 GB/s each way); 80 GB HBM3. DGX H100: eight ConnectX-7 at 400 Gb/s, one per GPU
    # (50 GB/s each way).
    "h100": Device("H100 SXM", 989e12, 450e9, 50e9, 8, 80e9),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: the H100's compute (BF16 1,979
    # TFLOPS with sparsity) and NVLink 900 GB/s, with 141 GB HBM3e. DGX H200: eight
    # ConnectX-7 at 400 Gb/s, one per GPU.
    "h200": Device("H200 SXM", 989e12, 450e9, 50e9, 8, 141e9),
    # NVIDIA HGX B200 datasheet: FP16/BF16 Tensor Core 4.5 PFLOPS per GPU with sparsity, so
    # 2.25 PFLOPS dense; fifth-generation NVLink 1.8 TB/s per GPU (900 GB/s each way);
    # DGX B200: 1,440 GB of GPU memory over 8 GPUs (180 GB each), eight ConnectX-7 at
    # 400 Gb/s.
    "b200": Device("B200", 2.25e15, 900e9, 50e9, 8, 180e9),
}


class ModelPreset(NamedTuple):
    """One MoE model at a published training layout."""

    name: str
    shape: MoELayerShape
    """Its MoE layer on one rank of that layout, in bf16."""
    layout: str
    """The layout, as published."""
    source: str
    """Where the model's sizes and the layout come from."""


def _tokens(seq_length: int, micro_batch: int, tp: int, cp: int) -> int:
    """Tokens entering the MoE layer on one rank: s b / TP (sequence parallel) / CP."""
    return seq_length * micro_batch // (tp * cp)


MODELS = {
    "mixtral-8x7b": ModelPreset(
        "Mixtral-8x7B",
        MoELayerShape(8, 2, 4096, 14336, _tokens(4096, 1, 1, 1), ep=8, etp=1),
        "TP1 PP4 EP8, seq 4096, micro-batch 1",
        "mistralai/Mixtral-8x7B-v0.1 config.json (H 4096, F 14336, 8 experts, top-2); "
        "Megatron-LM examples/mixtral/README.md: 'For training, the recommended model "
        "parallel config is TP1EP8PP4'",
    ),
    "qwen3-30b-a3b": ModelPreset(
        "Qwen3-30B-A3B",
        MoELayerShape(128, 8, 2048, 768, _tokens(4096, 1, 1, 1), ep=16, etp=1),
        "TP1 PP1 EP16, seq 4096, micro-batch 1 (16 GPUs)",
        "Qwen/Qwen3-30B-A3B config.json (H 2048, moe_intermediate_size 768, 128 experts, "
        "top-8); Megatron-Bridge recipes/qwen/h100/qwen3_moe.py "
        "qwen3_30b_a3b_pretrain_16gpu_h100_bf16_config",
    ),
    "qwen3-235b-a22b": ModelPreset(
        "Qwen3-235B-A22B",
        MoELayerShape(128, 8, 4096, 1536, _tokens(4096, 1, 4, 2), ep=8, etp=1),
        "TP4 (SP) PP16 CP2 EP8, seq 4096, micro-batch 1 (256 GPUs)",
        "Qwen/Qwen3-235B-A22B config.json (H 4096, moe_intermediate_size 1536, 128 experts, "
        "top-8); Megatron-Bridge recipes/qwen/h100/qwen3_moe.py "
        "qwen3_235b_a22b_pretrain_256gpu_h100_bf16_config",
    ),
    "deepseek-v3": ModelPreset(
        "DeepSeek-V3",
        MoELayerShape(256, 8, 7168, 2048, _tokens(4096, 1, 2, 1), ep=64, etp=1),
        "TP2 (SP) PP16 EP64, seq 4096, micro-batch 1",
        "deepseek-ai/DeepSeek-V3 config.json (H 7168, moe_intermediate_size 2048, 256 routed "
        "experts, top-8; the shared expert is not routed and costs nothing extra); "
        "Megatron-Bridge recipes/deepseek/deepseek_v3.py deepseek_v3_pretrain_config",
    ),
}
