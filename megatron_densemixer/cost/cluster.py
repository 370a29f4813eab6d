"""The dense backward on a cluster: predicted time per MoE layer and rank against conventional.

A roofline model of one MoE layer's training step on one rank, both layers at the device's
dense bf16 peak and its links' peak bandwidth, routing balanced:

    conventional   = expert GEMMs + EP all-to-alls
        expert GEMMs: 3 T k 2 H (F1 + F) FLOPs (the forward, and the backward's dgrad and
            wgrad; F1 = 2F gated);
        all-to-alls: dispatch and combine, forward and backward (4 of them), each moving the
            T k routed copies of x (H b bytes each) that leave the rank, (EP - 1) / EP of them:
            the share that stays on the node over NVLink, the share that leaves it over the
            inter-node link, at the same time; not overlapped with compute (Megatron's
            default). Router, permutation, attention and expert TP's gathers are left out.
    dense backward = max(dense reduction FLOPs, exchange)
        the ring overlaps each block's transfer with the GEMMs on the block before it, so the
        slower of the two sets the time; the exchange is every byte the rank receives
        (``comm_bytes``) over the ring's slowest link: the inter-node link once the
        expert-TP x EP group spans nodes, else NVLink.
    overhead       = dense backward / conventional; the layer's step takes 1 + overhead times
                     the conventional one.
"""

from __future__ import annotations

from typing import NamedTuple

from megatron_densemixer.cost import (
    DenseRouterGradCommBytes,
    DenseRouterGradMemoryBytes,
    MoELayerShape,
    comm_bytes,
    dense_flops,
    memory_bytes,
)


class Device(NamedTuple):
    """One GPU and its links, at datasheet peak."""

    name: str
    bf16_flops: float
    """Dense (not sparse) bf16 tensor-core FLOP/s."""
    nvlink_bandwidth: float
    """NVLink bytes/s per direction per GPU."""
    internode_bandwidth: float
    """Inter-node (InfiniBand) bytes/s per direction per GPU."""
    gpus_per_node: int
    """GPUs sharing one NVLink domain."""
    memory: float
    """HBM bytes per GPU."""


class ClusterCost(NamedTuple):
    """``cluster_cost``'s prediction for one MoE layer on one rank."""

    shape: MoELayerShape
    device: Device
    comm: DenseRouterGradCommBytes
    memory: DenseRouterGradMemoryBytes
    dense_flops: int
    conventional_flops: int
    spans_nodes: bool
    """The expert-TP x EP group spans nodes, so the ring runs at the inter-node bandwidth."""
    dense_compute_s: float
    dense_comm_s: float
    conventional_compute_s: float
    conventional_comm_s: float

    @property
    def link_bytes(self) -> int:
        """Bytes each ring link carries per direction: the token blocks (x, g, pair masks)."""
        return self.comm.hidden + self.comm.grad + self.comm.pairs

    @property
    def conventional_s(self) -> float:
        """The conventional layer's step: expert GEMMs plus exposed all-to-alls."""
        return self.conventional_compute_s + self.conventional_comm_s

    @property
    def dense_s(self) -> float:
        """The dense backward: its GEMMs and its exchange overlap."""
        return max(self.dense_compute_s, self.dense_comm_s)

    @property
    def overhead(self) -> float:
        """The dense backward's time over the conventional layer's."""
        return self.dense_s / self.conventional_s


def conventional_flops(shape: MoELayerShape) -> int:
    """Expert GEMM FLOPs of one conventional MoE step per rank: 3 T k 2 H (F1 + F).

    Balanced routing gives each rank T k (token, expert) pairs' worth of work at any EP and
    ETP; each costs one expert forward, 2 H (F1 + F), and its backward twice that.
    """
    f1 = 2 * shape.ffn if shape.gated else shape.ffn
    return 3 * shape.tokens * shape.topk * 2 * shape.hidden * (f1 + shape.ffn)


def all_to_all_seconds(shape: MoELayerShape, device: Device) -> float:
    """One EP all-to-all of the routed tokens (dispatch or combine) on one rank.

    A node holds gpus_per_node / ETP members of the EP group (all of them when EP is
    smaller); copies for members on the node go over NVLink, the others over the inter-node
    link, at the same time.
    """
    ep = shape.ep
    on_node = min(ep, max(1, device.gpus_per_node // shape.etp))
    routed = shape.tokens * shape.topk * shape.hidden * shape.element_size
    nvlink = routed * (on_node - 1) / ep / device.nvlink_bandwidth
    internode = routed * (ep - on_node) / ep / device.internode_bandwidth
    return max(nvlink, internode)


def cluster_cost(shape: MoELayerShape, device: Device, chunk_tokens: int) -> ClusterCost:
    """Predicted cost of exact DenseMixer for one MoE layer on one rank (module docstring).

    Args:
        shape: The layer on one rank (tokens, experts, sizes, EP, expert TP, dtype).
        device: The GPU and its links.
        chunk_tokens: Tokens per chunk of the dense reduction.

    Returns:
        FLOPs, bytes, memory and the predicted times.
    """
    comm = comm_bytes(shape)
    spans_nodes = shape.group_size > device.gpus_per_node
    ring_bandwidth = device.internode_bandwidth if spans_nodes else device.nvlink_bandwidth
    flops, conventional = dense_flops(shape), conventional_flops(shape)
    return ClusterCost(
        shape=shape,
        device=device,
        comm=comm,
        memory=memory_bytes(shape, chunk_tokens),
        dense_flops=flops,
        conventional_flops=conventional,
        spans_nodes=spans_nodes,
        dense_compute_s=flops / device.bf16_flops,
        dense_comm_s=comm.total / ring_bandwidth,
        conventional_compute_s=conventional / device.bf16_flops,
        conventional_comm_s=4 * all_to_all_seconds(shape, device),
    )
