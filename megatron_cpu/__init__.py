"""Megatron Core on CPU, with gloo: the runtime behind the demo, the benchmarks and the tests.

Not part of the plugin (``pip install .`` installs ``megatron_densemixer`` only); it imports
in the ``.venv`` that ``make`` builds (an editable install holding the checkout) or from the
repository root. One call sets a CPU process up for building Megatron layers:

    import megatron_cpu

    megatron_cpu.init_model_parallel(tp=1, ep=1, seed=1234)

applies the CPU shim, creates a one-process gloo world if there is none, sets up Megatron's
parallel state and seeds Megatron's RNG tracker. The modules:

* ``megatron_cpu.shim``: the runtime patches (``apply_cpu_shim``) and the optional pure-torch
  grouped GEMM for the legacy ``GroupedMLP`` (``install_grouped_gemm_fallback``);
* ``megatron_cpu.parallel``: ``init_model_parallel``, ``destroy_model_parallel``,
  ``init_process_group_single``;
* ``megatron_cpu.launch``: ``run_distributed`` (``fn(rank, world_size, *args)`` in a fresh
  gloo world of processes) and ``cached_world_runs``;
* ``megatron_cpu.sharding``: ``shard_moe_state_dict``, one rank's slice of a single-rank MoE
  state dict;
* ``megatron_cpu.models``: the configs and MoE layers the demo, benchmarks and tests build
  (``make_config``, ``build_moe_layer``, ``build_dense_layer``, ``build_pair``). Not imported
  here: it loads Megatron's model code and ``megatron_densemixer``.

Importing this package loads only torch; Megatron modules are imported where they are used.
"""

from megatron_cpu.launch import cached_world_runs, run_distributed
from megatron_cpu.parallel import (
    destroy_model_parallel,
    init_model_parallel,
    init_process_group_single,
)
from megatron_cpu.sharding import shard_moe_state_dict
from megatron_cpu.shim import apply_cpu_shim, install_grouped_gemm_fallback

__all__ = [
    "apply_cpu_shim",
    "cached_world_runs",
    "destroy_model_parallel",
    "init_model_parallel",
    "init_process_group_single",
    "install_grouped_gemm_fallback",
    "run_distributed",
    "shard_moe_state_dict",
]
