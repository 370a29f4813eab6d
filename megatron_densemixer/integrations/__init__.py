"""Doors into training frameworks: Megatron-LM, verl, NeMo-RL / Megatron-Bridge.

Each submodule is imported on its own and only where it is wanted. Nothing here patches a
framework at import time except ``megatron_densemixer.integrations.verl``, which verl imports
through ``actor_rollout_ref.model.external_lib`` precisely so that it patches.
"""
