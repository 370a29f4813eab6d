"""The dense backward's costs: communication (hand-computed and the real transfers), memory,
FLOPs, and the cluster model behind ``python -m megatron_densemixer.cost``."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_cpu.models import EXPERTS, FFN, HIDDEN
from megatron_densemixer import ring as dm_ring
from megatron_densemixer.cost import (
    MoELayerShape,
    chunk_tokens,
    dense_flops,
    dense_router_grad_comm_bytes,
    memory_bytes,
)
from megatron_densemixer.cost import __main__ as cost_cli
from megatron_densemixer.cost.cluster import (
    Device,
    all_to_all_seconds,
    cluster_cost,
    conventional_flops,
)
from megatron_densemixer.cost.presets import DEVICES, MODELS
from megatron_densemixer.experts import ExpertWeights
from tests.support.builders import parallel_config


def test_comm_bytes_single_rank_is_zero():
    """Without EP or expert TP the dense backward communicates nothing."""
    bytes_ = dense_router_grad_comm_bytes(parallel_config(), num_tokens_per_rank=4096)
    assert bytes_ == (0, 0, 0, 0, 0) and bytes_.total == 0


@pytest.mark.parametrize(
    "kw, dtype, expected",
    [
        # EP=4, ETP=1, fp32: P=4, L=2. x, g: 3*100*16*4 = 19200; scores: 3*100*2*4 = 2400;
        # token counts: 3*8 = 24.
        (dict(ep=4), None, (19200, 19200, 2400, 0, 24)),
        # EP=2 x ETP=2, bf16 x and g: P=4, L=4. x, g: 3*100*16*2 = 9600; scores: 3*100*4*4.
        (dict(ep=2, tp=2), torch.bfloat16, (9600, 9600, 4800, 0, 24)),
        # TP=2 with ETP=1, EP=2: P=2 (TP ranks outside the group). x, g: 1*100*16*4 = 6400;
        # scores: 1*100*4*4 = 1600; counts: 8.
        (dict(ep=2, tp=2, etp=1), None, (6400, 6400, 1600, 0, 8)),
        # ETP=2 alone: P=2, L=8: x, g: 6400; scores: 1*100*8*4 = 3200.
        (dict(etp=2), None, (6400, 6400, 3200, 0, 8)),
        # Top-M approximation adds the uint8 pair mask: 3*100*8 = 2400.
        (dict(ep=4, moe_dense_router_grad_topm=4), None, (19200, 19200, 2400, 2400, 24)),
    ],
)
def test_comm_bytes_hand_computed(kw, dtype, expected):
    """dense_router_grad_comm_bytes on hand-computed cases (T=100 tokens per rank, H=16,
    E=8): guards the formula against using the wrong group size, expert count or dtype."""
    tp, ep, etp = kw.pop("tp", 1), kw.pop("ep", 1), kw.pop("etp", None)
    config = parallel_config("alltoall", tp=tp, ep=ep, etp=etp, **kw)
    bytes_ = dense_router_grad_comm_bytes(config, 100, dtype=dtype)
    assert tuple(bytes_) == expected
    assert bytes_.total == sum(expected)


def test_comm_bytes_overrides_and_params_dtype():
    """Explicit EP/ETP override the config; x and g default to the params dtype."""
    config = parallel_config(params_dtype=torch.bfloat16, bf16=True)
    bytes_ = dense_router_grad_comm_bytes(
        config, 10, expert_model_parallel_size=8, expert_tensor_parallel_size=1
    )
    # P=8, L=1: x, g: 7*10*16*2 = 2240; scores: 7*10*1*4 = 280; counts: 7*8 = 56.
    assert tuple(bytes_) == (2240, 2240, 280, 0, 56)


@pytest.mark.parametrize("counts", [(5, 5, 5, 5), (5, 3, 0, 6)])
def test_comm_bytes_match_the_transfers(monkeypatch, counts):
    """The reported bytes equal what TokenRing.routing_weight_grads actually passes to its
    collectives and point-to-point ops, received and sent (counted for group rank 1 of a
    fake 4-member group, EP=2 x expert TP=2, with the pair mask travelling), so the formula
    cannot drift from the code. Uneven counts: each block travels with its own count."""
    config = parallel_config("alltoall", ep=2, tp=2, moe_dense_router_grad_topm=4)
    rank, group_size = 1, 4
    moved = {"all_gather": 0, "received": 0, "sent": 0}

    def all_gather_into_tensor(output, tensor, group=None):
        moved["all_gather"] += (output.numel() - tensor.numel()) * tensor.element_size()
        output.copy_(torch.tensor(counts))

    def batch_isend_irecv(ops):
        for op in ops:
            assert op.tensor.is_contiguous() and op.tensor.numel() > 0
            nbytes = op.tensor.numel() * op.tensor.element_size()
            if op.op is dm_ring.dist.irecv:
                moved["received"] += nbytes
                op.tensor.copy_(torch.randn(op.tensor.shape).to(op.tensor.dtype))
            else:
                moved["sent"] += nbytes
        return []

    def p2p_op(op, tensor, peer, group, tag):
        return SimpleNamespace(op=op, tensor=tensor, peer=peer, group=group, tag=tag)

    fake = dm_ring.dist
    monkeypatch.setattr(fake, "get_world_size", lambda group=None: group_size)
    monkeypatch.setattr(fake, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(fake, "get_global_rank", lambda group, group_rank: group_rank)
    monkeypatch.setattr(fake, "all_gather_into_tensor", all_gather_into_tensor)
    monkeypatch.setattr(fake, "batch_isend_irecv", batch_isend_irecv)
    monkeypatch.setattr(fake, "P2POp", p2p_op)
    local = EXPERTS // 2
    weights = [
        ExpertWeights(torch.randn(FFN, HIDDEN), None, torch.randn(HIDDEN, FFN // 2), None)
        for _ in range(local)
    ]
    reduction = dm_ring.TokenRing(
        config=config,
        chunk_size=3,
        tp_ep_group=object(),
        expert_tp_size=2,
        expert_tp_rank=1,
        local_expert_offset=0,
    )
    num_tokens = counts[rank]
    pairs = torch.ones(num_tokens, EXPERTS, dtype=torch.bool)
    scores = reduction.routing_weight_grads(
        torch.randn(num_tokens, HIDDEN), torch.randn(num_tokens, HIDDEN), weights, pairs
    )
    assert scores.shape == (num_tokens, EXPERTS)
    expected = dense_router_grad_comm_bytes(config, num_tokens)
    assert moved["all_gather"] == expected.token_counts
    if len(set(counts)) == 1:
        assert moved["received"] == moved["sent"] == expected.total - expected.token_counts
        return
    # Received: every other member's block (x, g in fp32, the uint8 mask) and P - 1 = 3
    # returns of this rank's [T_rank, L] partial G. Sent: every block but the next
    # member's (the ring's last hop), and the partial G of every other member's block.
    per_token = 2 * HIDDEN * 4 + EXPERTS
    total = sum(counts)
    assert moved["received"] == (total - num_tokens) * per_token + 3 * num_tokens * local * 4
    assert (
        moved["sent"] == (total - counts[rank + 1]) * per_token + (total - num_tokens) * local * 4
    )


# --------------------------------------------------------------------------------------
# Memory, FLOPs and the cluster model (python -m megatron_densemixer.cost)
# --------------------------------------------------------------------------------------
# E=8, k=2, H=16, F=6 gated, T=10 tokens per rank: the hand-computed cases below.
SMALL = MoELayerShape(8, 2, 16, 6, 10, element_size=4)


@pytest.mark.parametrize(
    "overrides, chunk, expected",
    [
        # One rank: no blocks; chunk 3 tokens x (4 (12 + 12) + 8 * 6 = 144); G: 10 * 8 * 4.
        (dict(), 3, (0, 432, 320)),
        # EP=4: two blocks of 10 x (2 * 16 * 4) = 1280 each; G 320 + 3 * 10 * 2 * 4 = 240.
        (dict(ep=4), 3, (2560, 432, 560)),
        # EP=2 x ETP=2, bf16, mask travelling (m = 8), chunk 20 > T = 10 tokens:
        # blocks 2 * 10 * (64 + 8) + 10 * 8 = 1520; chunk 10 x (2 (6 + 6) + 8 * 3 = 48) = 480
        # + gathered rows 10 (64 + 8) + mask 10 * 4 = 760; G 320 + 3 * 10 * 4 * 4 = 480.
        (dict(ep=2, etp=2, element_size=2, approximate=True), 20, (1520, 1240, 800)),
    ],
)
def test_memory_bytes_hand_computed(overrides, chunk, expected):
    """memory_bytes on hand-computed cases: guards the budget the exchange promises (and
    benchmarks.exchange_memory checks) against a wrong block count, dtype or F-slice."""
    memory = memory_bytes(SMALL._replace(**overrides), chunk)
    assert tuple(memory) == expected and memory.total == sum(expected)


def test_memory_bytes_do_not_grow_with_the_group():
    """From three members on, the blocks and the chunk cost the same at any EP, and the
    partial G ([T, E / EP]) shrink: the point of the ring (the all-gather it replaced
    held 2 P T H b)."""
    shape = MoELayerShape(256, 8, 7168, 2048, 2048)
    small, large = memory_bytes(shape._replace(ep=4), 64), memory_bytes(shape._replace(ep=64), 64)
    assert small[:2] == large[:2] and large.weight_grads < small.weight_grads


def test_flops_hand_computed():
    """dense_flops = P T L (2 H (F1_l + F_l) + 2 F_l), here 4 * 10 * 4 * (2 * 16 * 9 + 6) =
    47040 = T E (2 H (F1 + F) + 2 F) at EP=2 x ETP=2; conventional_flops = 3 T k 2 H (F1 + F)
    = 3 * 10 * 2 * 2 * 16 * 18 = 34560, the same at any EP."""
    assert dense_flops(SMALL._replace(ep=2, etp=2)) == 47040 == dense_flops(SMALL)
    assert conventional_flops(SMALL._replace(ep=4)) == 34560


DEVICE = Device("test", bf16_flops=1e6, nvlink_bandwidth=100.0, internode_bandwidth=10.0,
                gpus_per_node=2, memory=0.0)  # fmt: skip


@pytest.mark.parametrize(
    "ep, etp, expected",
    [
        # Routed bytes 10 * 2 * 16 * 2 = 640. EP=2 fits a node: 640 * 1/2 / 100.
        (2, 1, 3.2),
        # EP=4, two members per node: NVLink 640 * 1/4 / 100 = 1.6, IB 640 * 2/4 / 10 = 32.
        (4, 1, 32.0),
        # ETP=2 leaves one EP member per node: IB 640 * 3/4 / 10 = 48.
        (4, 2, 48.0),
    ],
)
def test_all_to_all_seconds_hand_computed(ep, etp, expected):
    """The conventional layer's all-to-all: the off-node share over the inter-node link."""
    shape = SMALL._replace(ep=ep, etp=etp, element_size=2, num_experts=8)
    assert all_to_all_seconds(shape, DEVICE) == pytest.approx(expected)


def test_cluster_cost_hand_computed():
    """cluster_cost at EP=4 on 2-GPU nodes, bf16: the ring spans nodes, so its 2184 bytes
    (x, g: 3 * 10 * 16 * 2 each; scores 3 * 10 * 2 * 4; counts 24) take 218.4 s at 10 B/s,
    against 0.04704 s of dense GEMMs; conventional: 0.03456 s of GEMMs + 4 * 32 s of
    all-to-alls. Overhead 218.4 / 128.03456."""
    cost = cluster_cost(SMALL._replace(ep=4, element_size=2), DEVICE, chunk_tokens=3)
    assert cost.spans_nodes and cost.comm.total == 2184 and cost.link_bytes == 1920
    assert cost.dense_s == pytest.approx(218.4)
    assert cost.dense_compute_s == pytest.approx(0.04704)
    assert cost.conventional_s == pytest.approx(128.03456)
    assert cost.overhead == pytest.approx(218.4 / 128.03456)
    # One node: NVLink (100 B/s) and no all-to-all leaves the node.
    local = cluster_cost(SMALL._replace(ep=2, element_size=2), DEVICE, chunk_tokens=3)
    assert not local.spans_nodes and local.dense_comm_s == pytest.approx(local.comm.total / 100)


def test_chunk_tokens_reads_the_options():
    """The chunk size comes from the options of any config object: the budget over the
    per-token bytes (4 (128 + 128) + 8 * 64 = 1536 for F=64 gated fp32), or the fixed size."""
    budget = SimpleNamespace(moe_dense_router_grad_chunk_budget_mb=1.0)
    assert chunk_tokens(budget, 64, True, 4) == 2**20 // 1536
    fixed = SimpleNamespace(moe_dense_router_grad_chunk_size=7)
    assert chunk_tokens(fixed, 64, True, 4) == 7


def test_presets_are_consistent():
    """Every preset's experts split evenly over its EP ranks and F over its expert TP, and
    every device figure is positive (a typo such as 0 would make the model divide by 0)."""
    for preset in MODELS.values():
        s = preset.shape
        assert s.num_experts % s.ep == 0 and s.ffn % s.etp == 0 and s.tokens > 0
        assert preset.source and preset.layout
    for device in DEVICES.values():
        assert min(device.bf16_flops, device.nvlink_bandwidth, device.internode_bandwidth) > 0


def test_cli(capsys):
    """python -m megatron_densemixer.cost: a preset report, the table (every preset on every
    device), a preset with an override, and a clear error when a shape flag is missing."""
    cost_cli.main(["--model", "deepseek-v3", "--device", "h200"])
    out = capsys.readouterr().out
    assert "E=256 k=8 H=7168 F=2048" in out and "H200" in out and "overhead" in out
    cost_cli.main(["--table"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(MODELS) * len(DEVICES)
    cost_cli.main(["--model", "mixtral-8x7b", "--tokens", "128"])
    assert "T=128 tokens/rank" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give --model or all of --topk"):
        cost_cli.main(["--experts", "8", "--hidden", "64", "--ffn", "32", "--tokens", "16"])


BAD_CLI = [
    (["--ep", "0"], "--ep must be a positive integer, got 0"),
    (["--topk", "0"], "--topk must be a positive integer, got 0"),
    (["--topk", "16", "--experts", "8"], r"--topk \(16\) must not exceed --experts \(8\)"),
    (["--tokens", "-5"], "--tokens must be a positive integer, got -5"),
    (["--ep", "3", "--experts", "8", "--topk", "2"], r"--ep \(3\) must divide --experts \(8\)"),
    (["--etp", "3"], r"--etp \(3\) must divide --ffn \(2048\)"),
]


@pytest.mark.parametrize("flags,message", BAD_CLI, ids=[" ".join(f) for f, _ in BAD_CLI])
def test_cli_refuses_bad_shapes(flags, message):
    """--ep 0 / --topk 0 divided by zero, --topk 16 with 8 experts printed 0.17x, --tokens -5
    printed negative costs and --ep 3 with 8 experts was floored silently: each is refused
    with the flag named."""
    with pytest.raises(SystemExit, match=f"error: {message}"):
        cost_cli.main(["--model", "deepseek-v3", *flags])


def test_cli_imports_neither_torch_nor_megatron():
    """The cost model is arithmetic: importing the package and running its CLI used to take
    about 8 s of Megatron imports and print Megatron's warnings."""
    code = (
        "import sys, megatron_densemixer, megatron_densemixer.cost.__main__ as cli; "
        "cli.main(['--model', 'qwen3-30b-a3b']); "
        "print(megatron_densemixer.__version__, 'torch' in sys.modules, 'megatron' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith(" False False")
    assert result.stderr == ""
