"""Post-training adaptation: pretrain on task A conventionally, fine-tune on task B in arms.

Task. Tokens are (sub-language l, content c) pairs, id = l * R + c. Sub-language l follows
next-token table T_{tau(l)} on the content (a permutation of the R contents) and stays in
l; at each position the sequence jumps to a random sub-language of the task and a random
content with probability ``switch_prob``. The input embedding is fixed (not trained):
emb(l, c) = u_c + lang_scale * v_l, u and v random unit vectors, so the content part of a
token looks the same in every sub-language and an expert that has learnt table T on one
sub-language computes it on any other.

Task A: sub-languages 0..L-1 with tables tau(l) = l. Task B: L new sub-languages L..2L-1 whose
tables are A's, re-mapped: tau(L + i) = pi(i) for a random permutation pi (per seed). After
pretraining on A each table has its experts; the ideal routing for B sends sub-language L + i
to the experts that served table pi(i) on A. It is known, it differs from where the router
first sends the new sub-languages, and it costs A nothing (B's sub-languages are new ids).

Arms (same pretrained weights, data and fine-tuning seed): ``frozen`` (router weights never
train), ``conventional``, ``densemixer`` (exact), ``ema`` (the EMA estimator) and ``topm``
(exact on the top-M experts by score).

Metrics on held-out batches, per MoE layer, averaged over layers:

- loss on B, and on A (forgetting);
- ideal-routing agreement on B: the fraction of tokens whose top-1 expert is one that served
  the token's table on A (owner(e) = the table whose tokens e took most often as top-1 at the
  end of pretraining);
- specialisation: the uncertainty coefficient I(table; top-1 expert) / H(table);
- load balance: the normalised entropy of the top-k expert loads (1 = even).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from examples._common import EXPERIMENT_ARMS, mean_or_none
from examples._synthetic import _Inputs, build_model, routing_agreement
from megatron_densemixer.diagnostics import normalized_entropy
from megatron_densemixer.ema import ExpertOutputEMA


@dataclass
class AdaptationConfig:
    """Task, model and schedule of one seed's pretraining and fine-tuning runs."""

    tables: int = 4
    """L: sub-languages in A (and in B), each with its own table."""
    contents: int = 16
    """R: contents per sub-language."""
    switch_prob: float = 0.1
    lang_scale: float = 0.5
    """Norm of the sub-language part of the embedding, against 1 for the content part."""
    seq_length: int = 32
    batch_size: int = 16
    hidden: int = 64
    experts: int = 8
    topk: int = 2
    layers: int = 1
    expert_ffn: int = 8
    topm: int = 4
    """M of the ``topm`` arm."""
    ema_decay: float = 0.99
    aux_loss_coeff: float = 1e-2
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    eval_every: int = 50
    eval_batches: int = 4

    @property
    def vocab_size(self) -> int:
        """2 L R: A's and B's sub-languages."""
        return 2 * self.tables * self.contents

    @property
    def loss_floor(self) -> float:
        """Bayes-optimal loss (nats) within one task: a jump (probability p) lands on any of
        the task's L R tokens, otherwise the next token is determined."""
        p, v = self.switch_prob, self.tables * self.contents
        hit, miss = 1 - p + p / v, p / v
        return -(hit * math.log(hit) + (v - 1) * miss * math.log(miss))


class AdaptationTask:
    """Tables, the B re-mapping and the fixed embedding of one seed."""

    def __init__(self, cfg: AdaptationConfig, seed: int) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(20_000 + seed)
        r = cfg.contents
        self.tables = torch.stack([torch.randperm(r, generator=g) for _ in range(cfg.tables)])
        self.remap = torch.randperm(cfg.tables, generator=g)  # pi: B's i uses table pi(i)
        # table of every sub-language: A's l -> l, B's L + i -> pi(i).
        self.table_of_language = torch.cat([torch.arange(cfg.tables), self.remap])
        content = torch.randn(r, cfg.hidden, generator=g)
        language = torch.randn(2 * cfg.tables, cfg.hidden, generator=g)
        content = content / content.norm(dim=1, keepdim=True)
        language = cfg.lang_scale * language / language.norm(dim=1, keepdim=True)
        self.embedding = (language[:, None, :] + content[None, :, :]).reshape(-1, cfg.hidden)

    def sample(self, phase: str, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Token ids of task ``phase`` ("A" or "B"), [batch_size, seq_length + 1]."""
        cfg = self.cfg
        first = 0 if phase == "A" else cfg.tables
        length = cfg.seq_length + 1
        shape = (batch_size, length)
        fresh_lang = first + torch.randint(0, cfg.tables, shape, generator=generator)
        fresh_content = torch.randint(0, cfg.contents, shape, generator=generator)
        switch = torch.rand(shape, generator=generator) < cfg.switch_prob
        switch[:, 0] = True
        lang = torch.empty(shape, dtype=torch.long)
        content = torch.empty(shape, dtype=torch.long)
        lang[:, 0], content[:, 0] = fresh_lang[:, 0], fresh_content[:, 0]
        for i in range(1, length):
            table = self.table_of_language[lang[:, i - 1]]
            following = self.tables[table, content[:, i - 1]]
            lang[:, i] = torch.where(switch[:, i], fresh_lang[:, i], lang[:, i - 1])
            content[:, i] = torch.where(switch[:, i], fresh_content[:, i], following)
        return lang * cfg.contents + content

    def table(self, tokens: torch.Tensor) -> torch.Tensor:
        """The table each token's sub-language follows."""
        return self.table_of_language[tokens // self.cfg.contents]


def arm_options(arm: str, cfg: AdaptationConfig) -> Dict[str, Any]:
    """The DenseMixer options of an arm (``frozen`` and ``conventional``: off)."""
    if arm not in EXPERIMENT_ARMS:
        raise ValueError(f"arm must be one of {EXPERIMENT_ARMS}, got {arm!r}.")
    options: Dict[str, Any] = {"moe_dense_router_grad": arm in ("densemixer", "ema", "topm")}
    if arm == "ema":
        options.update(
            moe_dense_router_grad_estimator="ema", moe_dense_router_grad_ema_decay=cfg.ema_decay
        )
    if arm == "topm":
        options["moe_dense_router_grad_topm"] = cfg.topm
    return options


def arm_model(arm: str, cfg: AdaptationConfig, task: AdaptationTask, seed: int):
    """The model of one arm (see ``build_model``), with ``task``'s fixed input embedding."""
    return build_model(
        cfg,
        seed,
        cfg.vocab_size,
        cfg.seq_length,
        frozen_router=arm == "frozen",
        embedding=task.embedding,
        **arm_options(arm, cfg),
    )


def _routers(model: torch.nn.Module) -> List[torch.nn.Module]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


@torch.no_grad()
def route_and_score(model, batches: List[torch.Tensor]) -> Dict[str, Any]:
    """Held-out loss, and per MoE layer the top-1 expert and top-k loads of every token."""
    model.eval()
    routers = _routers(model)
    captured: List[List[Any]] = [[] for _ in routers]
    handles = [
        router.register_forward_hook(
            lambda module, args, output, i=i: captured[i].append((output[0], output[1]))
        )
        for i, router in enumerate(routers)
    ]
    inputs = _Inputs(batches[0].shape[0], batches[0].shape[1] - 1)
    losses = []
    try:
        for batch in batches:
            loss = model(
                batch[:, :-1], inputs.position_ids, inputs.attention_mask, labels=batch[:, 1:]
            )
            losses.append(loss.float().mean().item())
    finally:
        for handle in handles:
            handle.remove()
    model.train()
    top1, loads = [], []
    for outputs in captured:
        probs = torch.cat([p.reshape(-1, p.shape[-1]) for p, _ in outputs])
        routing_map = torch.cat([m.reshape(-1, m.shape[-1]) for _, m in outputs])
        top1.append(probs.argmax(-1))
        loads.append(routing_map.sum(0))
    # Router tokens are ordered [seq, batch].
    tokens = torch.cat([b[:, :-1].t().reshape(-1) for b in batches])
    return {"loss": sum(losses) / len(losses), "top1": top1, "loads": loads, "tokens": tokens}


def owners(task: AdaptationTask, routed: Dict[str, Any]) -> List[List[int]]:
    """Per layer and expert, the table whose tokens it took most often as top-1 (-1: none)."""
    table = task.table(routed["tokens"])
    result = []
    for top1 in routed["top1"]:
        counts = torch.zeros(task.cfg.experts, task.cfg.tables, dtype=torch.long)
        counts.index_put_((top1, table), torch.ones_like(top1), accumulate=True)
        owner = counts.argmax(1)
        owner[counts.sum(1) == 0] = -1
        result.append(owner.tolist())
    return result


def evaluate(model, task: AdaptationTask, eval_a, eval_b, owner: List[List[int]]) -> Dict[str, Any]:
    """Loss on A and B, ideal-routing agreement, specialisation and load balance on B."""
    on_a, on_b = route_and_score(model, eval_a), route_and_score(model, eval_b)
    table = task.table(on_b["tokens"])
    agreement, specialisation, balance = [], [], []
    for layer, top1 in enumerate(on_b["top1"]):
        owned = torch.tensor(owner[layer])[top1]
        agreement.append(float((owned == table).double().mean()))
        specialisation.append(routing_agreement(table, top1, task.cfg.tables))
        balance.append(normalized_entropy(on_b["loads"][layer]))
    return {
        "loss_b": on_b["loss"],
        "loss_a": on_a["loss"],
        "ideal_agreement": mean_or_none(agreement),
        "specialisation": mean_or_none(specialisation),
        "load_balance": mean_or_none(balance),
    }


def _train(
    model,
    task: AdaptationTask,
    phase: str,
    steps: int,
    lr: float,
    seed: int,
    on_eval: Optional[Callable[[int], None]] = None,
    eval_every: int = 0,
    progress: Optional[Callable[[int, int, float], None]] = None,
) -> Dict[str, List[float]]:
    """AdamW on task ``phase``; returns per-step loss, wall and CPU time."""
    cfg = task.cfg
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # The same training stream in every arm of a seed.
    generator = torch.Generator().manual_seed(seed * 7919 + (0 if phase == "A" else 1))
    inputs = _Inputs(cfg.batch_size, cfg.seq_length)
    history: Dict[str, List[float]] = {"loss": [], "step_time": [], "step_cpu_time": []}
    if on_eval is not None:
        on_eval(0)
    for step in range(1, steps + 1):
        batch = task.sample(phase, cfg.batch_size, generator)
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch[:, :-1], inputs.position_ids, inputs.attention_mask, labels=batch[:, 1:])
        loss = loss.float().mean()
        loss.backward()
        optimizer.step()
        history["step_time"].append(time.perf_counter() - start)
        history["step_cpu_time"].append(time.process_time() - start_cpu)
        history["loss"].append(loss.item())
        if on_eval is not None and (step % eval_every == 0 or step == steps):
            on_eval(step)
        if progress is not None:
            progress(step, steps, loss.item())
    return history


@dataclass
class Pretrained:
    """One seed's conventionally pretrained model: weights, expert owners and its figures."""

    state_dict: Dict[str, Any]
    owner: List[List[int]]
    evals: List[Dict[str, Any]] = field(default_factory=list)
    history: Dict[str, List[float]] = field(default_factory=dict)


def eval_sets(task: AdaptationTask, seed: int) -> Dict[str, List[torch.Tensor]]:
    """Held-out batches of A and B, from their own stream (never trained on)."""
    cfg = task.cfg
    gen = torch.Generator().manual_seed(1_000_000 + seed)
    return {
        phase: [task.sample(phase, cfg.batch_size, gen) for _ in range(cfg.eval_batches)]
        for phase in ("A", "B")
    }


def pretrain(
    cfg: AdaptationConfig,
    seed: int,
    progress: Optional[Callable[[int, int, float], None]] = None,
) -> Pretrained:
    """Trains a conventional model on A; the experts' owners come from A's held-out set."""
    task = AdaptationTask(cfg, seed)
    model = arm_model("conventional", cfg, task, seed)
    held_out = eval_sets(task, seed)
    evals: List[Dict[str, Any]] = []

    def on_eval(step: int) -> None:
        routed = route_and_score(model, held_out["A"])
        evals.append({"step": step, "loss_a": routed["loss"]})

    history = _train(
        model,
        task,
        "A",
        cfg.pretrain_steps,
        cfg.pretrain_lr,
        seed,
        on_eval,
        cfg.eval_every,
        progress,
    )
    routed = route_and_score(model, held_out["A"])
    owner = owners(task, routed)
    table = task.table(routed["tokens"])
    evals[-1]["specialisation_a"] = mean_or_none(
        [routing_agreement(table, top1, cfg.tables) for top1 in routed["top1"]]
    )
    state = {
        k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()
    }
    return Pretrained(state, owner, evals, history)


def router_grad_fidelity(
    model, helpers: Dict[str, Any], batch: torch.Tensor
) -> Dict[str, Optional[float]]:
    """``model``'s router weight gradient against exact DenseMixer's on ``batch``.

    Cosines of the whole gradient and of its dense term (minus the conventional gradient),
    averaged over MoE layers, computed on copies so that ``model`` is not touched.

    Args:
        model: The arm's model.
        helpers: "shadow" (same arm; receives ``model``'s weights and EMA tables), "exact"
            and "conventional" models; each receives ``model``'s weights.
        batch: Token ids, [batch, seq + 1].
    """
    state = model.state_dict()
    for helper in helpers.values():
        helper.load_state_dict(state, strict=True)
    # The EMA tables are not in the state dict (non-persistent buffers).
    for source, target in zip(model.modules(), helpers["shadow"].modules(), strict=True):
        if isinstance(source, ExpertOutputEMA):
            target.table, target.updates = source.table.clone(), source.updates.clone()
    inputs = _Inputs(batch.shape[0], batch.shape[1] - 1)
    grads = {}
    for name, m in helpers.items():
        m.zero_grad(set_to_none=True)
        loss = m(batch[:, :-1], inputs.position_ids, inputs.attention_mask, labels=batch[:, 1:])
        loss.float().mean().backward()
        grads[name] = [r.weight.grad.double().flatten() for r in _routers(m)]

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    layers = range(len(grads["exact"]))
    conv = grads["conventional"]
    return {
        "cosine": mean_or_none([cosine(grads["shadow"][i], grads["exact"][i]) for i in layers]),
        "dense_cosine": mean_or_none(
            [cosine(grads["shadow"][i] - conv[i], grads["exact"][i] - conv[i]) for i in layers]
        ),
    }


def finetune(
    arm: str,
    cfg: AdaptationConfig,
    seed: int,
    pretrained: Pretrained,
    progress: Optional[Callable[[int, int, float], None]] = None,
) -> Dict[str, Any]:
    """Fine-tunes the pretrained model on B in one arm; returns its curves and summary."""
    task = AdaptationTask(cfg, seed)
    model = arm_model(arm, cfg, task, seed)
    model.load_state_dict(pretrained.state_dict, strict=True)
    held_out = eval_sets(task, seed)
    helpers = {}
    if arm in ("ema", "topm"):
        kinds = {"shadow": arm, "exact": "densemixer", "conventional": "conventional"}
        helpers = {name: arm_model(kind, cfg, task, seed) for name, kind in kinds.items()}
    evals: List[Dict[str, Any]] = []

    def on_eval(step: int) -> None:
        result = evaluate(model, task, held_out["A"], held_out["B"], pretrained.owner)
        result["step"] = step
        if helpers and step > 0:
            # Against exact DenseMixer on the same weights, on a held-out B batch.
            fidelity = router_grad_fidelity(model, helpers, held_out["B"][0])
            result["fidelity_cosine"] = fidelity["cosine"]
            result["fidelity_dense_cosine"] = fidelity["dense_cosine"]
        evals.append(result)

    history = _train(
        model,
        task,
        "B",
        cfg.finetune_steps,
        cfg.finetune_lr,
        seed,
        on_eval,
        cfg.eval_every,
        progress,
    )
    final = evals[-1]
    return {
        "arm": arm,
        "seed": seed,
        "evals": evals,
        "history": history,
        "summary": {
            "loss_b": final["loss_b"],
            "loss_a": final["loss_a"],
            "ideal_agreement": final["ideal_agreement"],
            "specialisation": final["specialisation"],
            "load_balance": final["load_balance"],
            "fidelity_cosine": final.get("fidelity_cosine"),
            "fidelity_dense_cosine": final.get("fidelity_dense_cosine"),
            "step_time": mean_or_none(history["step_time"]),
            "step_cpu_time": mean_or_none(history["step_cpu_time"]),
        },
    }


def config_dict(cfg: AdaptationConfig) -> Dict[str, Any]:
    """The config as a JSON-ready dict, with the derived sizes."""
    return {**asdict(cfg), "vocab_size": cfg.vocab_size, "loss_floor": cfg.loss_floor}
