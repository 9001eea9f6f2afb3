"""Megatron's distributed optimizer with fp32 parameters in a bf16 model (Parcae's injection
and readout stay fp32): make its checkpoint map agree with its optimizer groups.

``DistributedOptimizer`` numbers each parameter within its optimizer group in gradient-buffer
order (``model_param_group_index_map``), but gives the inner optimizer each group's shards as
[fp32 parameters..., fp32 copies of the 16-bit parameters...]. When a group holds both kinds,
the two orders differ, and every lookup through the map (the optimizer state in checkpoints,
saved and loaded) pairs a parameter with another parameter's state: saving a checkpoint of a
bf16 run with ``--use-distributed-optimizer`` failed at the first save with
``AssertionError: (torch.Size([4096]), 0, 64)`` (megatron-core 0.19.2). Training itself is
unaffected (the step uses the per-kind lists). The fix renumbers the map in the inner
optimizer's order after construction; for a model whose groups hold one kind it is the same map.

Without Apex or Transformer Engine (the CPU backend; torch's Adam), megatron-core 0.19.2 also
cannot *load* a distributed-optimizer checkpoint: ``sharded_state_dict(is_loading=True)``
reads the 'step' of every parameter's state before any state exists (``assert len(steps) ==
1``). The fix creates the states first with Megatron's own dummy step (zero gradients), as it
does for Megatron-FSDP; the load then overwrites them.

And loading copies the saved main parameters into the optimizer's shards with ``copy_``
outside ``no_grad``: for an fp32 model parameter the shard is a view of the parameter itself
(Parcae's fp32 injection / readout in a bf16 run, or any fp32 run), so the resume failed with
"a view of a leaf Variable that requires grad is being used in an in-place operation" (also on
a GPU). The copy runs under ``torch.no_grad()``.

Without Apex/TE the 'step' of torch's Adam was also overwritten, after the checkpoint's step
had been restored, by the placeholder step of the freshly built optimizer (the per-parameter
copy in ``dp_reshardable`` loading, which does not save it); the copy now keeps the restored
step, as Megatron's ``fully_sharded_model_space`` loader does. And ``load_state_dict`` gives
every parameter's torch-Adam state the *same* 'step' tensor, which torch increments in place
once per parameter: after a resume the bias correction used a step count N times too large
and the run diverged from the uninterrupted one at the first resumed update. Each state
gets its own copy.

The functions here are what the patches of ``DistributedOptimizer`` call; they are installed by
``training/megatron_patches.py``.
"""

from __future__ import annotations

import torch


def align_group_index_map(optimizer) -> None:
    """Renumber ``model_param_group_index_map`` as the inner optimizer's groups are ordered."""
    mapping = {}
    for group_index, (fp32, float16) in enumerate(zip(optimizer.model_fp32_groups,
                                                      optimizer.model_float16_groups,
                                                      strict=True)):
        for order, param in enumerate([*fp32, *float16]):
            mapping[param] = (group_index, order)
    assert mapping.keys() == optimizer.model_param_group_index_map.keys()
    optimizer.model_param_group_index_map = mapping


def init_states_before_loading(optimizer, is_loading: bool) -> None:
    """Without Apex/TE, create the optimizer states (Megatron's dummy step) before a load
    reads their 'step'; a no-op otherwise."""
    from megatron.core.optimizer import distrib_optimizer

    if is_loading and not distrib_optimizer.HAVE_APEX_OR_TE and not optimizer.optimizer.state:
        optimizer._init_optimizer_states_with_dummy_values()


def untie_steps(optimizer) -> None:
    """Without Apex/TE, give every parameter's torch-Adam state its own 'step' tensor after
    ``load_state_dict`` (which shares one between all of them)."""
    from megatron.core.optimizer import distrib_optimizer

    if not distrib_optimizer.HAVE_APEX_OR_TE:
        for state in optimizer.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def keep_restored_step(optimizer, model_param, tensors: dict) -> dict:
    """The per-parameter tensors to copy into the optimizer, with 'step' replaced by the
    step already restored for ``model_param``'s state.

    'step' is not saved per parameter (it is the param groups' step, restored by
    ``load_state_dict``); the value in ``tensors`` is this process's pre-load placeholder.
    """
    if "step" in tensors and not optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        group_index, order = optimizer.model_param_group_index_map[model_param]
        main_param = optimizer.optimizer.param_groups[group_index]["params"][order]
        current = optimizer.optimizer.state[main_param].get("step")
        if isinstance(current, torch.Tensor):
            tensors = {**tensors, "step": current.clone()}
    return tensors
