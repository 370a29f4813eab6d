"""Step time and memory of one MoE layer: conventional, DenseMixer (this plugin), reference.

Three implementations of the same layer, sharing one set of weights, run the same
forward + backward (loss = <y, g> with a fixed random g, and dL/dx computed):

* ``conventional``: Megatron Core's MoELayer (allgather dispatcher, SequentialMLP experts).
* ``densemixer``: DenseMixerMoELayer. The forward is MoELayer's; the backward recomputes
  every expert on every token, chunk by chunk, to get G[t, e] = <g_t, E_e(x_t)>.
* ``reference``: the reference DenseMixer approach written here from the math (docs/design.md,
  "The math"): every expert runs on every token in the forward and keeps its activations;
  y = sparse.detach() + (dense - dense.detach()) with dense = sum_e w_e E_e(x), and each
  expert's output gradient is masked to the tokens that selected it.

Cost per token in units of one expert forward (docs/design.md, "What it costs"): conventional 3k,
densemixer 3k + E, reference 3E, so the theoretical step-time ratios to conventional are
(3k + E) / 3k and E / k. They count expert GEMMs only (router, permutation and elementwise
work are left out).

Memory is measured two ways, both as bytes handed out by torch's CPU allocator (weights,
the input and everything alive before the step are excluded):

* ``peak``: the highest total of live tensor bytes allocated during one forward + backward,
  from the allocation events of ``torch.profiler`` (``profile_memory=True``), replayed in
  time order. It includes activations, transient backward buffers and the parameter grads.
* ``saved``: bytes of the tensors autograd saves for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``; unique storages, weights and input excluded).

It also times the no-grad forward (inference, RL log-prob passes) of conventional against
densemixer, and the cost and router-gradient fidelity of the two opt-in approximations
(``moe_dense_router_grad_topm``, ``moe_dense_router_grad_token_fraction``) and of the EMA
estimator (``moe_dense_router_grad_estimator="ema"``) against the exact DenseMixer gradient.

Runs on CPU through the repository's CPU runtime for Megatron (``megatron_cpu``), in fp32, with one
torch thread by default, and reports this process's CPU time per call (``--clock wall`` for
elapsed time): on a machine shared with other jobs, CPU time with one thread measures the work
done, while elapsed time also counts the waits for a core. Warm-up, then ``--repeats`` rounds
in which the implementations run round-robin; times are medians, ratios the median over rounds
of the per-round ratio to conventional. In the ``.venv`` that ``make`` builds, or from the
repository root (so that ``megatron_cpu`` is importable):

    .venv/bin/python -m benchmarks --json results/bench.json
    .venv/bin/python -m benchmarks --shapes quick

Modules: ``shapes`` (what is measured), ``reference_layer`` and ``layers`` (the three layers),
``measure`` (timers, peak and saved memory), ``fidelity`` (router-gradient fidelity of the
approximations), ``runs`` (one shape, the approximations), ``report`` (targets, tables,
metadata), ``__main__`` (the command line).
"""
