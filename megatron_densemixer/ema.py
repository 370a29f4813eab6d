"""The EMA estimator: DenseMixer's router gradient with E_e(x) replaced by a running mean.

``moe_dense_router_grad_estimator="ema"`` (after Default MoE, Panda et al. 2025, arXiv
2504.12463, here as a straight-through gradient with the forward left conventional) keeps
A_e, a running mean of expert e's output E_e(x) (without its routing weight) over the tokens
that selected e, and in the backward projects every token's g on it:

    G[t, e] = <g_t, A_e>          one [T, H] x [H, E] GEMM instead of E expert recomputes

The rest is exactly DenseMixer's: G reaches the router only through the non-selected
experts' dense weights ("partscale"); the selected experts keep their conventional
gradient. The "gated" variant's baseline sum_{j in K} (w_j / c) G_j uses A_j as well, so it
costs nothing extra and needs no token exchange under expert parallelism.

Update, once per training forward of the layer (grad enabled and some router parameter
trainable: no-grad passes, evaluation and the first pass of activation recompute do
nothing):

    m_e = sum_{t: e in K_t} E_e(x_t) / n_e     over every token of the pipeline stage
    A_e <- m_e                                 the first time e is selected (n_e > 0)
    A_e <- beta A_e + (1 - beta) m_e           afterwards, when n_e > 0
    A_e unchanged                              when no token selected e

An expert never selected yet has A_e = 0 and gets no dense gradient (as in conventional
training) until its first batch sets it. The decay beta applies per forward, i.e. per
micro-batch: with M micro-batches per step the table forgets at beta^M per optimizer step.

Where E_e(x) comes from: Megatron's experts (SequentialMLP, GroupedMLP, TEGroupedMLP) apply
the routing weight w inside the expert, before fc2 and to fc2's bias, so every output row is
w E_e(x). A forward hook on the experts module divides the rows by their permuted probs and
sums them per local expert: no GEMM, no extra activation memory, and by construction the
function the forward ran. Rows with w = 0 (quantization padding, an underflowed weight)
are skipped.

Parallelism: each rank sums its local experts over the tokens dispatched to it, places them
in an [E, H + 1] block (the last column counts tokens, on expert-TP rank 0 only: the other
expert-TP ranks see the same tokens and hold partial sums of the outputs over their F slice),
and the block is all-reduced over the expert-TP x EP group and then the expert data-parallel
group. That covers every rank of the pipeline stage once, so the table is identical on all
ranks; only E x (H + 1) floats travel, never a token. The backward needs no communication.

Checkpointing: the table is a non-persistent buffer of a parameter-free child module, so
state dicts (and distributed checkpoints) keep exactly the conventional keys and load in
either direction. It is not saved: after a restart each expert's entry is rebuilt from its
first batch (the warm-up rule), which costs the smoothing of about 1 / (1 - beta) forwards.

Precision: the table, its sums and G are fp32 whatever the model dtype (an increment of
1 - beta = 0.01 is below bf16's resolution of a unit-sized entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def expert_output_sums(
    expert_output: torch.Tensor,
    tokens_per_expert: Any,
    permuted_probs: torch.Tensor,
    num_local_experts: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per local expert, the sum of E_e(x) over its dispatched tokens and their count.

    Args:
        expert_output: The experts module's output, [N, H]: row i is w_i E_e(x_i) for the
            expert e whose block holds row i.
        tokens_per_expert: Rows per local expert, in order ([L] tensor or list); sums to N.
        permuted_probs: The routing weight w_i of each row, [N] (or [N, 1]).
        num_local_experts: L.

    Returns:
        (sums [L, H], counts [L]), fp32. Rows with w = 0 are left out of both.
    """
    hidden = expert_output.shape[-1]
    rows = expert_output.reshape(-1, hidden).float()
    weights = permuted_probs.reshape(-1).float()
    valid = weights != 0
    unweighted = torch.where(
        valid.unsqueeze(-1), rows / torch.where(valid, weights, 1.0).unsqueeze(-1), 0.0
    )
    counts_per_expert = torch.as_tensor(tokens_per_expert, device=rows.device)
    # output_size: no device-to-host sync to size the result.
    expert_ids = torch.repeat_interleave(
        torch.arange(num_local_experts, device=rows.device),
        counts_per_expert,
        output_size=rows.shape[0],
    )
    sums = rows.new_zeros((num_local_experts, hidden)).index_add_(0, expert_ids, unweighted)
    counts = rows.new_zeros(num_local_experts).index_add_(0, expert_ids, valid.float())
    return sums, counts


def ema_update(
    table: torch.Tensor,
    updates: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    decay: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One update of the table from this forward's sums (see the module docstring).

    Args:
        table: A, [E, H] fp32.
        updates: How many updates have seen each expert so far, [E] int64.
        sums: sum of E_e(x_t) over the tokens that selected e, [E, H] fp32.
        counts: n_e, [E].
        decay: beta, in [0, 1).

    Returns:
        The new (table, updates), as new tensors (the arguments are not modified, so a
        backward that saved the old table keeps it).
    """
    seen = (counts > 0).unsqueeze(-1)
    mean = sums / counts.clamp(min=1).unsqueeze(-1)
    first = seen & (updates == 0).unsqueeze(-1)
    blended = torch.where(first, mean, decay * table + (1.0 - decay) * mean)
    return torch.where(seen, blended, table), updates + seen.squeeze(-1).long()


def ema_routing_weight_grads(grad: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """G[t, e] = <g_t, A_e>, [num_tokens, E] fp32.

    Args:
        grad: g = dL/dy, [num_tokens, H].
        table: A, [E, H] fp32.
    """
    return grad.float() @ table.t()


class ExpertOutputEMA(torch.nn.Module):
    """A_e for every expert of one MoE layer, kept identical on all ranks of its stage.

    A parameter-free module whose buffers are non-persistent (state dicts are unchanged).
    The layer's forward hook on its experts module adds ``expert_output_block`` into the
    forward call's record, and its postprocess step passes the sum to ``update``, which
    reduces it over the groups, updates the table and returns it for the backward.
    """

    table: torch.Tensor
    """A, [num_experts, hidden_size] fp32; zero rows for experts never selected yet."""
    updates: torch.Tensor
    """How many updates have seen each expert, [num_experts] int64."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        decay: float,
        local_expert_offset: int = 0,
        expert_tp_rank: int = 0,
        groups: Sequence[Optional[dist.ProcessGroup]] = (),
        device: Optional[torch.device] = None,
    ) -> None:
        """Builds an empty table.

        Args:
            num_experts: E.
            hidden_size: H.
            decay: beta, in [0, 1) (``moe_dense_router_grad_ema_decay``).
            local_expert_offset: Global index of this rank's first local expert.
            expert_tp_rank: This rank's expert-TP rank; only rank 0 counts tokens.
            groups: Process groups to all-reduce the sums over, in turn (the expert-TP x EP
                group, then the expert data-parallel group); None entries are skipped.
            device: Where the table lives (the layer's device).
        """
        super().__init__()
        self.decay = decay
        self.local_expert_offset = local_expert_offset
        self.expert_tp_rank = expert_tp_rank
        self.groups = [g for g in groups if g is not None and dist.get_world_size(g) > 1]
        zeros = torch.zeros((num_experts, hidden_size), dtype=torch.float32, device=device)
        self.register_buffer("table", zeros, persistent=False)
        updates = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.register_buffer("updates", updates, persistent=False)

    def expert_output_block(
        self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> torch.Tensor:
        """This rank's per-expert sums of one experts-module call, as an [E, H + 1] block.

        Args:
            module: The experts module (SequentialMLP, GroupedMLP or TEGroupedMLP).
            args: Its positional arguments (dispatched tokens, tokens per expert, probs).
            kwargs: Its keyword arguments.
            output: Its output, (output [N, H], bias); see ``expert_output_sums``.

        Returns:
            fp32 [E, H + 1]: the sums of E_e(x) in the local experts' rows, their token counts
            in the last column (zero on expert-TP ranks other than 0), zeros elsewhere.
        """
        names = ("permuted_local_hidden_states", "tokens_per_expert", "permuted_probs")
        # Megatron passes them positionally; accept keywords too.
        values = dict(zip(names, args, strict=False)) | kwargs
        num_local = module.num_local_experts
        with torch.no_grad():
            sums, counts = expert_output_sums(
                output[0], values["tokens_per_expert"], values["permuted_probs"], num_local
            )
            if self.expert_tp_rank != 0:
                counts = torch.zeros_like(counts)
            block = torch.zeros(
                (self.table.shape[0], self.table.shape[1] + 1),
                dtype=torch.float32,
                device=sums.device,
            )
            local = slice(self.local_expert_offset, self.local_expert_offset + num_local)
            block[local, :-1] = sums
            block[local, -1] = counts
        return block

    def update(self, block: Optional[torch.Tensor]) -> torch.Tensor:
        """Reduces one forward call's block over the groups, updates and returns A.

        Args:
            block: The call's summed ``expert_output_block``s, [E, H + 1] fp32.

        Returns:
            The updated table, [num_experts, hidden_size] fp32. Later updates replace the
            buffer with a new tensor, so this one stays as it is for the backward.

        Raises:
            RuntimeError: ``block`` is None: the experts module's forward hook did not run
                during this forward (an experts module called other than through
                ``__call__``).
        """
        if block is None:
            raise RuntimeError(
                "moe_dense_router_grad_estimator='ema': the experts module's forward hook did "
                "not run in this forward, so the expert output means are missing; use "
                "moe_dense_router_grad_estimator='exact' with this expert module."
            )
        with torch.no_grad():
            for group in self.groups:
                dist.all_reduce(block, group=group)
            self.table, self.updates = ema_update(
                self.table.to(block.device, torch.float32),
                self.updates.to(block.device),
                block[:, :-1],
                block[:, -1],
                self.decay,
            )
        return self.table

    def reset(self) -> None:
        """Forgets every expert's mean (each is set again by its next batch).

        For when the expert weights were replaced, e.g. loaded from a checkpoint into a model
        that has already trained.
        """
        self.table, self.updates = torch.zeros_like(self.table), torch.zeros_like(self.updates)

    def extra_repr(self) -> str:
        return f"experts={self.table.shape[0]}, hidden={self.table.shape[1]}, decay={self.decay}"


@dataclass(eq=False)
class EMAEstimator:
    """The EMA estimator for one forward call: G[t, e] = <g_t, A_e>, no token exchange."""

    table: torch.Tensor
    """A after this call's update, [num_experts, H] fp32."""

    def routing_weight_grads(
        self, hidden: torch.Tensor, grad: torch.Tensor, pairs: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``ema_routing_weight_grads(grad, table)``, [num_tokens, num_experts] fp32; ``hidden`` and
        ``pairs`` are unused (the options refuse approximations with this estimator)."""
        del hidden, pairs
        return ema_routing_weight_grads(grad, self.table)


def build_expert_output_ema(
    layer: torch.nn.Module, config: Any, pg_collection: Any, decay: float
) -> ExpertOutputEMA:
    """Builds the table for an MoE layer.

    Args:
        layer: A built MoELayer (its router, experts and local expert indices exist).
        config: The layer's config.
        pg_collection: The layer's process groups (``tp_ep``, ``expt_tp``, ``expt_dp``).
        decay: ``moe_dense_router_grad_ema_decay``.

    Returns:
        The module; assign it to the layer so that it moves with it, and feed it from a
        forward hook on the experts module (``expert_output_block``).

    Raises:
        ValueError: ``pg_collection`` has no expert data-parallel group.
    """
    expert_dp = getattr(pg_collection, "expt_dp", None)
    if expert_dp is None:
        # Without it each data-parallel replica would keep its own table.
        raise ValueError(
            "moe_dense_router_grad_estimator='ema' needs the expert data-parallel group "
            "(pg_collection.expt_dp) to keep the table identical on all ranks; pass a "
            "ProcessGroupCollection that has it, or use moe_dense_router_grad_estimator='exact'."
        )
    return ExpertOutputEMA(
        num_experts=config.num_moe_experts,
        hidden_size=config.hidden_size,
        decay=decay,
        local_expert_offset=layer.local_expert_indices[0],
        expert_tp_rank=pg_collection.expt_tp.rank(),
        groups=(pg_collection.tp_ep, expert_dp),
        device=layer.router.weight.device,
    )
