"""The synthetic routing task and the CPU training loop shared by the demo and the experiment.

Task: a vocabulary of L sub-languages of R tokens each; token t belongs to sub-language t // R.
A sequence is made of segments, each in one sub-language; inside sub-language l the next token
is perm_l(current), with perm_l a random permutation of that sub-language's R tokens (a
different lookup table per sub-language). At each position the segment switches to a random
sub-language (and a random token) with probability ``switch_prob``; those positions are
unpredictable. Every table is a separate function that an expert's FFN has to memorise, so
with small experts a router that sends each sub-language to its own experts should help. The
ideal assignment is known: route by the sub-language of the current token.

Routing agreement, per MoE layer, on held-out tokens: the uncertainty coefficient

    U = I(lang; e1) / H(lang)

between a token's sub-language and its top-1 expert e1 (the expert with the highest routing
prob). U = 1 exactly when every expert's top-1 tokens come from a single sub-language (each
sub-language may own several experts); U = 0 when the top-1 expert says nothing about it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol

import torch

from examples._common import DEMO_ARMS, mean_or_none
from megatron_cpu import init_model_parallel
from megatron_cpu.models import make_config
from megatron_densemixer import DenseMixerTransformerConfig, densemixer_spec
from megatron_densemixer.diagnostics import RouterDiagnostics, normalized_entropy

if TYPE_CHECKING:
    from megatron.core.models.gpt.gpt_model import GPTModel


@dataclass
class TaskConfig:
    """The synthetic mixture of sub-languages."""

    languages: int = 4
    tokens_per_language: int = 32
    switch_prob: float = 0.1
    seq_length: int = 64

    @property
    def vocab_size(self) -> int:
        """Total vocabulary, L * R."""
        return self.languages * self.tokens_per_language

    @property
    def loss_floor(self) -> float:
        """The Bayes-optimal per-token loss (nats): the entropy of the next token given the
        current one, which is perm(current) w.p. 1 - p + p / V and each other token w.p. p / V."""
        p, v = self.switch_prob, self.vocab_size
        hit, miss = 1 - p + p / v, p / v
        return -(hit * math.log(hit) + (v - 1) * miss * math.log(miss))


@dataclass
class RunConfig:
    """One training run (one arm, one seed)."""

    arm: str = "densemixer"
    seed: int = 0
    steps: int = 300
    batch_size: int = 16
    hidden: int = 64
    experts: int = 8
    topk: int = 2
    layers: int = 2
    expert_ffn: int = 32
    lr: float = 3e-3
    aux_loss_coeff: float = 1e-2
    eval_every: int = 25
    eval_batches: int = 4
    task: TaskConfig = field(default_factory=TaskConfig)


class SubLanguageTask:
    """Samples batches of the task; the permutation tables depend only on ``seed``."""

    def __init__(self, task: TaskConfig, seed: int) -> None:
        self.task = task
        g = torch.Generator().manual_seed(10_000 + seed)
        r = task.tokens_per_language
        # next_token[t] for every token t: perm_l applied inside t's own sub-language.
        self.next_token = torch.cat(
            [torch.randperm(r, generator=g) + lang * r for lang in range(task.languages)]
        )

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Token ids, [batch_size, seq_length + 1] (inputs are [:, :-1], labels [:, 1:])."""
        task = self.task
        length = task.seq_length + 1
        fresh = torch.randint(0, task.vocab_size, (batch_size, length), generator=generator)
        switch = torch.rand(batch_size, length, generator=generator) < task.switch_prob
        switch[:, 0] = True
        tokens = torch.empty(batch_size, length, dtype=torch.long)
        tokens[:, 0] = fresh[:, 0]
        for i in range(1, length):
            tokens[:, i] = torch.where(switch[:, i], fresh[:, i], self.next_token[tokens[:, i - 1]])
        return tokens

    def language(self, tokens: torch.Tensor) -> torch.Tensor:
        """The sub-language of each token."""
        return tokens // self.task.tokens_per_language


def routing_agreement(language: torch.Tensor, expert: torch.Tensor, languages: int) -> float:
    """U = I(lang; expert) / H(lang) from paired labels (see the module docstring)."""
    joint = torch.zeros(languages, int(expert.max()) + 1, dtype=torch.float64)
    joint.index_put_((language, expert), torch.ones(language.numel(), dtype=torch.float64), True)
    joint /= joint.sum()
    p_lang, p_expert = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mutual = float((joint[nz] * (joint / (p_lang * p_expert))[nz].log()).sum())
    h_lang = float(-(p_lang[p_lang > 0] * p_lang[p_lang > 0].log()).sum())
    return mutual / h_lang if h_lang > 0 else 0.0


class ModelSizes(Protocol):
    """The model sizes ``build_model`` reads; RunConfig and the experiment's config have them."""

    layers: int
    hidden: int
    experts: int
    topk: int
    expert_ffn: int
    aux_loss_coeff: float


def model_config(sizes: ModelSizes, **options: Any) -> DenseMixerTransformerConfig:
    """The config of ``build_model``'s MoE layers.

    The shared CPU defaults (fp32 router, SwiGLU experts without biases, allgather
    dispatcher) with ``sizes``, the aux loss on and no dropout.

    Args:
        sizes: Layers, hidden size, experts, top-k, expert FFN size and aux loss coefficient.
        **options: DenseMixer config options, ``moe_dense_router_grad`` and the rest.

    Returns:
        The validated config.
    """
    return make_config(
        num_layers=sizes.layers,
        hidden_size=sizes.hidden,
        ffn_hidden_size=sizes.expert_ffn,
        moe_ffn_hidden_size=sizes.expert_ffn,
        num_moe_experts=sizes.experts,
        moe_router_topk=sizes.topk,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=sizes.aux_loss_coeff,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **options,
    )


def build_model(
    sizes: ModelSizes,
    seed: int,
    vocab_size: int,
    seq_length: int,
    *,
    frozen_router: bool = False,
    embedding: Optional[torch.Tensor] = None,
    **options: Any,
) -> GPTModel:
    """A Megatron Core GPTModel whose MLPs are DenseMixer MoE layers, on CPU.

    The input and output embeddings are tied. The same ``seed`` gives the same initial
    weights in every arm: no DenseMixer option changes a parameter or an initialiser.

    Args:
        sizes: Layers, hidden size, experts, top-k, expert FFN size and aux loss coefficient.
        seed: Seeds Megatron's RNG tracker and torch's default generator before the build.
        vocab_size: Vocabulary size.
        seq_length: Maximum sequence length.
        frozen_router: Router weights never train (the ``frozen`` arm).
        embedding: A fixed embedding, [vocab_size, hidden], copied in and never trained.
        **options: DenseMixer config options (see ``model_config``).

    Returns:
        The model.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    init_model_parallel(tp=1, ep=1, seed=seed)
    config = model_config(sizes, **options)
    spec = densemixer_spec(
        get_gpt_layer_local_spec(num_experts=sizes.experts, moe_grouped_gemm=False)
    )
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        # Tied embeddings: the output layer cannot hold the next-token tables by itself, so
        # the experts have to map each token's embedding to its successor's. With a fixed
        # ``embedding`` the output layer also treats every sub-language alike, and only the
        # experts (and the router) learn.
        share_embeddings_and_output_weights=True,
    )
    if embedding is not None:
        weight = model.embedding.word_embeddings.weight
        with torch.no_grad():
            weight.copy_(embedding)
        weight.requires_grad_(False)
    if frozen_router:
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.requires_grad_(False)
    return model


def _routers(model: torch.nn.Module) -> List[torch.nn.Module]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


class _Inputs:
    """Position ids and the explicit causal mask (Megatron's default mask is made on CUDA)."""

    def __init__(self, batch_size: int, seq_length: int) -> None:
        self.position_ids = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1)
        self.attention_mask = torch.triu(
            torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool), diagonal=1
        )


@torch.no_grad()
def evaluate(model, task: SubLanguageTask, batches: List[torch.Tensor]) -> Dict[str, Any]:
    """Held-out loss, routing agreement and expert load (top-k pairs), per MoE layer."""
    model.eval()
    routers = _routers(model)
    captured: List[List[torch.Tensor]] = [[] for _ in routers]
    handles = [
        router.register_forward_hook(
            lambda module, args, output, i=i: captured[i].append((output[0], output[1]))
        )
        for i, router in enumerate(routers)
    ]
    losses, languages = [], []
    inputs = _Inputs(batches[0].shape[0], batches[0].shape[1] - 1)
    try:
        for batch in batches:
            ids, labels = batch[:, :-1], batch[:, 1:]
            loss = model(ids, inputs.position_ids, inputs.attention_mask, labels=labels)
            losses.append(loss.float().mean().item())
            # Router tokens are ordered [seq, batch]; match the labels to that order.
            languages.append(task.language(ids).t().reshape(-1))
    finally:
        for handle in handles:
            handle.remove()
    model.train()
    language = torch.cat(languages)
    agreement, entropy, load = [], [], []
    for outputs in captured:
        probs = torch.cat([p.reshape(-1, p.shape[-1]) for p, _ in outputs])
        routing_map = torch.cat([m.reshape(-1, m.shape[-1]) for _, m in outputs])
        agreement.append(routing_agreement(language, probs.argmax(-1), task.task.languages))
        counts = routing_map.sum(0)
        entropy.append(normalized_entropy(counts))
        load.append((counts / counts.sum()).tolist())
    return {
        "loss": sum(losses) / len(losses),
        "agreement": agreement,
        "load_entropy": entropy,
        "expert_load": load,
    }


HISTORY_KEYS = (
    "loss",
    "step_time",
    "step_cpu_time",
    "grad_norm",
    "dense_share",
    "cosine",
    "routing_flips",
    "train_load_entropy",
)
"""The per-step curves of a run."""


def _train_step(
    model,
    optimizer: torch.optim.Optimizer,
    diagnostics: RouterDiagnostics,
    batch: torch.Tensor,
    inputs: _Inputs,
    history: Dict[str, List[Any]],
) -> float:
    """One optimizer step on ``batch``; appends its loss, times and router stats to
    ``history`` and returns the loss."""
    start, start_cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    loss = model(batch[:, :-1], inputs.position_ids, inputs.attention_mask, labels=batch[:, 1:])
    loss = loss.float().mean()
    loss.backward()
    stats = diagnostics.step()
    optimizer.step()
    history["step_time"].append(time.perf_counter() - start)
    # CPU time of this process (all threads): less sensitive to other load on the machine.
    history["step_cpu_time"].append(time.process_time() - start_cpu)
    history["loss"].append(loss.item())
    history["grad_norm"].append(mean_or_none([s.grad_norm for s in stats]))
    history["dense_share"].append(mean_or_none([s.dense_share for s in stats]))
    history["cosine"].append(mean_or_none([s.cosine for s in stats]))
    history["routing_flips"].append(mean_or_none([s.routing_flips for s in stats]))
    history["train_load_entropy"].append(mean_or_none([s.load_entropy for s in stats]))
    return loss.item()


def train(
    run: RunConfig, progress: Optional[Callable[[int, int, float], None]] = None
) -> Dict[str, Any]:
    """Trains one arm.

    Args:
        run: The arm, seed, sizes and schedule.
        progress: Called after every step with (step, total steps, loss).

    Returns:
        The run's config, the task's optimal loss, the per-step curves and the evals.
    """
    if run.arm not in DEMO_ARMS:
        raise ValueError(f"arm must be one of {DEMO_ARMS}, got {run.arm!r}.")
    task = SubLanguageTask(run.task, run.seed)
    model = build_model(
        run,
        run.seed,
        run.task.vocab_size,
        run.task.seq_length,
        frozen_router=run.arm == "frozen",
        moe_dense_router_grad=run.arm == "densemixer",
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
    diagnostics = RouterDiagnostics(model, log_to_tracker=False)
    # Separate streams: training data identical across arms, held-out data never trained on.
    train_gen = torch.Generator().manual_seed(run.seed)
    eval_gen = torch.Generator().manual_seed(1_000_000 + run.seed)
    eval_set = [task.sample(run.batch_size, eval_gen) for _ in range(run.eval_batches)]
    inputs = _Inputs(run.batch_size, run.task.seq_length)
    history: Dict[str, List[Any]] = {key: [] for key in HISTORY_KEYS}
    evals = [{**evaluate(model, task, eval_set), "step": 0}]
    for step in range(1, run.steps + 1):
        batch = task.sample(run.batch_size, train_gen)
        loss = _train_step(model, optimizer, diagnostics, batch, inputs, history)
        if step % run.eval_every == 0 or step == run.steps:
            evals.append({**evaluate(model, task, eval_set), "step": step})
        if progress is not None:
            progress(step, run.steps, loss)
    diagnostics.remove()
    return {
        "config": dataclasses.asdict(run),
        "loss_floor": run.task.loss_floor,
        "history": history,
        "evals": evals,
    }


def summarize(result: Dict[str, Any], tail: float = 0.1) -> Dict[str, Optional[float]]:
    """Table row: train loss and router stats averaged over the last ``tail`` of the steps,
    held-out metrics at the end (averaged over MoE layers), mean wall time per step."""
    history, final = result["history"], result["evals"][-1]
    n = max(1, int(len(history["loss"]) * tail))
    return {
        "train_loss": mean_or_none(history["loss"][-n:]),
        "heldout_loss": final["loss"],
        "load_entropy": mean_or_none(final["load_entropy"]),
        "agreement": mean_or_none(final["agreement"]),
        "router_grad_norm": mean_or_none(history["grad_norm"][-n:]),
        "dense_share": mean_or_none(history["dense_share"][-n:]),
        "cosine": mean_or_none(history["cosine"][-n:]),
        "routing_flips": mean_or_none(history["routing_flips"][-n:]),
        "step_time": mean_or_none(history["step_time"]),
        "step_cpu_time": mean_or_none(history["step_cpu_time"]),
    }
