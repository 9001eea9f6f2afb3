"""Every patched Megatron internal still has the signature its patch was written for, and no
module outside ``training/megatron_patches.py`` (and the CPU backend) patches Megatron.

When megatron-core is upgraded, a failure here names the patch to re-check against the new
source before anything trains with it.
"""

from __future__ import annotations

import ast
import inspect
from importlib.metadata import version
from pathlib import Path

import pytest

from parcae_megatron.platform import cpu_backend
from parcae_megatron.platform.patching import MEGATRON_CORE, Patch
from parcae_megatron.training import megatron_patches
from tests.distributed import ROOT

_OPT = "megatron.core.optimizer.optimizer"
_DISTOPT = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"
_EOPT = "megatron.core.optimizer.emerging_optimizers"

# target -> its signature in megatron-core 0.19.2 (names, kinds and plain defaults; see
# ``_shape``). A registry (not a function) is "<dict>".
EXPECTED = {
    "megatron.training.arguments:add_megatron_arguments": "(parser)",
    "argparse:HelpFormatter._expand_help": "(self, action)",
    "megatron.training.initialize:_compile_dependencies": "()",
    "megatron.training.training:training_log":
        "(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag, "
        "skipped_iter, grad_norm, params_norm, num_zeros_in_grad, max_attention_logit, "
        "pg_collection=None, is_first_iteration=False, seqlen_squared_sum_in_batch=None, "
        "total_real_tokens_in_batch=None)",
    "megatron.training.training:evaluate":
        "(forward_step_func, data_iterator, model, process_non_loss_data_func, config, "
        "verbose=False, non_loss_data_func=None, eval_iters=None, pg_collection=None, "
        "p2p_communicator=None)",
    "megatron.training.global_vars:_set_wandb_writer": "(args)",
    "megatron.training.training:train_step":
        "(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config, "
        "forward_backward_func, iteration=None, pg_collection=None, p2p_communicator=None)",
    "megatron.training.training:finalize_model_grads":
        "(model, num_tokens=None, pg_collection=None, force_all_reduce=False)",
    "megatron.training.training:post_training_step_callbacks":
        "(model, optimizer, opt_param_scheduler, iteration, prof, "
        "num_floating_point_operations_since_last_log_event, nsys_nvtx_context=None)",
    "megatron.training.training:get_megatron_optimizer":
        "(config, model_chunks, config_overrides=None, use_gloo_process_groups=True, "
        "pg_collection=None, dump_param_to_param_group_map=None)",
    f"{_OPT}:MegatronOptimizer.prepare_grads": "(self)",
    f"{_OPT}:MixedPrecisionOptimizer.prepare_grads": "(self)",
    f"{_OPT}:FP32Optimizer.prepare_grads": "(self)",
    f"{_OPT}:MegatronOptimizer.get_parameters": "(self)",
    f"{_OPT}:ChainedOptimizer.prepare_grads": "(self)",
    f"{_DISTOPT}.__init__":
        "(self, optimizer, config, grad_scaler, init_state_fn, model_chunks, per_model_buffers, "
        "data_parallel_group, data_parallel_group_gloo, data_parallel_group_idx, "
        "distributed_optimizer_instance_id)",
    f"{_DISTOPT}.sharded_state_dict":
        "(self, model_sharded_state_dict={}, is_loading=False, sharding_type=None, "
        "metadata=None)",
    f"{_DISTOPT}.load_state_dict": "(self, state_dict)",
    f"{_DISTOPT}._set_main_param_and_optimizer_states": "(self, model_param, tensors)",
    f"{_EOPT}:_EMERGING_OPTIMIZERS": "<dict>",
    f"{_EOPT}:EmergingOptimizerEntry":
        "(optimizer_cls, init_state_fn=..., config_to_kwargs=None, "
        "default_param_overrides=...)",
    f"{_EOPT}:_eopt_init_state_fn": "(opt, config=None)",
    f"{_EOPT}:_muon_config_to_kwargs": "(config, model_chunks, pg_collection)",
    f"{_EOPT}:TensorParallelMuon.__init__":
        "(self, params, lr=0.0003, momentum=0.95, nesterov=True, weight_decay=0.01, "
        "use_decoupled_weight_decay=True, split_qkv=False, is_qkv_fn=None, "
        "qkv_split_shapes=None, fp32_matmul_prec='medium', coefficient_type='quintic', "
        "num_ns_steps=5, scale_mode='spectral', extra_scale_factor=1.0, pg_collection=None, "
        "tp_mode='duplicated')",
    f"{_EOPT}:TensorParallelMuon._init_group": "(self, group, skip_non_grad_params=True)",
    "megatron.core.optimizer.layer_wise_optimizer:tag_params_for_buffer_routing":
        "(model_chunks)",
    "megatron.training.training:tag_params_for_buffer_routing": "(model_chunks)",
    "megatron.training.training:get_megatron_optimizer_config": "(args)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async:"
    "FileSystemWriterAsync.preload_tensors": "(write_buckets, non_blocking=True)",
    "megatron.training.checkpointing:schedule_async_save": "(async_request)",
    "megatron.core.dist_checkpointing.strategies.async_utils:"
    "PersistentAsyncCaller._get_process":
        "(rank, mp_mode='spawn', cpu_priority=10, io_priority=None)",
    "megatron.training.training:OptimizerParamScheduler":
        "(optimizer, init_lr, max_lr, min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style, "
        "start_wd, end_wd, wd_incr_steps, wd_incr_style, use_checkpoint_opt_param_scheduler="
        "True, override_opt_param_scheduler=False, wsd_decay_steps=None, "
        "lr_wsd_decay_style=None)",
    # platform/cpu_backend.py
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state":
        "(device='cuda', clone=False, graph_safe=False)",
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state":
        "(new_state, device=-1, graph_safe=False)",
    "megatron.training.training:initialize_megatron":
        "(allow_no_cuda=False, skip_mpu_initialization=False, get_embedding_ranks=None, "
        "get_position_embedding_ranks=None, store=None, skip_model_parallel_init=False, "
        "seed_pp_group=None, seed_dp_group=None, seed_tp_group=None, seed_ep_group=None, "
        "seed_etp_group=None, skip_random_seed=False)",
    "megatron.training.arguments:get_device_arch_version": "()",
    "megatron.training.training:set_jit_fusion_options": "(tp_size=None)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async:get_write_results_queue":
        "(mp_mode='spawn')",
    **{f"torch.cuda:{name}": shape for name, shape in (
        ("current_device", "()"), ("synchronize", "(device=None)"),
        ("current_stream", "(device=None)"), ("default_stream", "(device=None)"),
        ("Stream", "(device=None, priority=0, **kwargs)"), ("stream", "(stream)"),
        ("get_rng_state", "(device='cuda')"), ("set_rng_state", "(new_state, device='cuda')"),
        ("manual_seed", "(seed)"), ("manual_seed_all", "(seed)"), ("empty_cache", "()"),
        ("memory_allocated", "(device=None)"), ("max_memory_allocated", "(device=None)"),
        ("device_count", "()"), ("set_device", "(device)"))},
    "torch.cuda.random:get_rng_state": "(device='cuda')",
    "torch.cuda.random:set_rng_state": "(new_state, device='cuda')",
    "torch.autograd.graph:_engine_run_backward": "(t_outputs, *args, **kwargs)",
    "torch.autograd:_engine_run_backward": "(t_outputs, *args, **kwargs)",
    # private overrides by subclassing (megatron_patches.OVERRIDES)
    f"{_DISTOPT}._init_optimizer_states_with_dummy_values": "(self)",
    "megatron.core.transformer.transformer_layer:TransformerLayer._forward_attention":
        "(self, hidden_states, attention_mask=None, context=None, context_mask=None, "
        "rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, "
        "rotary_pos_cos_sin=None, attention_bias=None, inference_context=None, "
        "packed_seq_params=None, sequence_len_offset=None, padding_mask=None, *, "
        "inference_params=None)",
    "megatron.core.transformer.attention:SelfAttention.get_query_key_value_tensors":
        "(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True)",
    "torch.nn.modules.module:Module._apply": "(self, fn, recurse=True)",
}

ALL_PATCHES = (*megatron_patches.PATCHES, *megatron_patches.OVERRIDES, *cpu_backend.PATCHES)


def _shape(obj) -> str:
    """A signature without annotations; defaults other than plain literals print as '...'."""
    if isinstance(obj, dict):
        return "<dict>"
    parts, star_done = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star_done = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = p.name
        if p.default is not p.empty:
            plain = p.default is None or isinstance(p.default, (bool, int, float, str))
            text += "=" + (repr(p.default) if plain or p.default == {} else "...")
        parts.append(text)
    return "(" + ", ".join(parts) + ")"


def _resolve(target: str):
    return Patch(target, "", "", "").original()


@pytest.mark.parametrize("patch", ALL_PATCHES, ids=[p.target for p in ALL_PATCHES])
def test_patched_signatures_are_the_ones_the_patches_were_written_for(patch):
    for target in (patch.target, *patch.relies_on):
        assert target in EXPECTED, f"{target} (patch {patch.target}) has no expected signature"
        got = _shape(_resolve(target))
        assert got == EXPECTED[target], (
            f"megatron-core changed {target}, which the patch of {patch.target} "
            f"({patch.change}) was written for in megatron-core {patch.version} "
            f"(installed: {version('megatron-core')}):\n  expected {EXPECTED[target]}\n"
            f"  got      {got}\nre-check the patch against the new source")


def test_every_record_is_complete_and_unique():
    assert len({p.target for p in ALL_PATCHES}) == len(ALL_PATCHES)
    for patch in ALL_PATCHES:
        assert patch.version == MEGATRON_CORE
        assert patch.replaces and patch.change and patch.why, patch.target
    assert set(EXPECTED) == {t for p in ALL_PATCHES for t in (p.target, *p.relies_on)}


def test_every_private_override_by_subclassing_has_a_record():
    """Every ``_``-named method a class of ``model/`` or ``training/`` defines over one of a
    Megatron (or torch) base class has a record in ``megatron_patches.OVERRIDES``."""
    import importlib
    import pkgutil

    import parcae_megatron.model
    import parcae_megatron.training

    recorded = {p.target.rsplit(":", 1)[-1] for p in megatron_patches.OVERRIDES}
    found = set()
    for package in (parcae_megatron.model, parcae_megatron.training):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for cls in vars(module).values():
                if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                    continue
                for name, value in vars(cls).items():
                    if not callable(value) or not name.startswith("_") or name.startswith("__"):
                        continue
                    owner = next((b for b in cls.__mro__[1:] if name in vars(b)), None)
                    if owner is not None and owner.__module__.split(".")[0] in ("megatron",
                                                                               "torch"):
                        found.add(f"{owner.__name__}.{name}")
    assert found <= recorded, f"private overrides without a record: {found - recorded}"
    assert {"TransformerLayer._forward_attention", "Module._apply"} <= found


def test_a_different_megatron_core_is_refused_in_one_line_unless_allowed(monkeypatch, capsys):
    monkeypatch.setattr(megatron_patches, "version", lambda name: "0.99.0")
    with pytest.raises(SystemExit) as exit_info:
        megatron_patches.check_megatron_version({})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "0.99.0" in err and MEGATRON_CORE in err and "PARCAE_ALLOW_MEGATRON_VERSION" in err
    megatron_patches.check_megatron_version({"PARCAE_ALLOW_MEGATRON_VERSION": "1"})
    monkeypatch.setattr(megatron_patches, "version", lambda name: MEGATRON_CORE)
    megatron_patches.check_megatron_version({})


def test_the_convert_phase_installs_the_cpu_backend_and_names_its_patches():
    assert megatron_patches.install("convert", ["--foo"]) == ["--foo"]
    line = megatron_patches.report("convert")
    assert line.startswith(f"parcae: convert patches of megatron-core {MEGATRON_CORE}: ")
    assert "add_megatron_arguments" in line
    if cpu_backend.is_active():
        assert "initialize_megatron" in line and "current_device" in line
    with pytest.raises(ValueError, match="unknown patch phase"):
        megatron_patches.install("serve")


def test_the_check_phase_lets_parcae_muon_parse_and_help_print():
    assert megatron_patches.install("check", ["--help"]) == ["--help"]
    line = megatron_patches.report("check")
    assert "add_megatron_arguments" in line and "_expand_help" in line
    from parcae_megatron.training.validation import trainer_parser

    assert trainer_parser().parse_args(["--optimizer", "parcae_muon"]).optimizer == "parcae_muon"


def test_patches_are_installed_only_by_a_patch_phase():
    """Outside ``megatron_patches`` and the CPU backend, package and launcher code installs
    patches only through ``megatron_patches.install`` (one call per entry point)."""
    phase_api = {"install", "report", "active", "check_megatron_version"}
    backend = {"maybe_activate", "activate", "patch_megatron_training"}
    found = []
    for path in sorted([*ROOT.glob("parcae_megatron/**/*.py"), *ROOT.glob("launch/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("parcae_megatron/training/megatron_patches.py",
                   "parcae_megatron/platform/cpu_backend.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)):
                continue
            module, name = node.func.value.id, node.func.attr
            if (module == "megatron_patches" and name not in phase_api) or (
                    module == "cpu_backend" and name in backend):
                found.append(f"{rel}:{node.lineno} {node.func.attr}")
    assert not found, f"patches installed outside a patch phase: {found}"


def test_the_registry_patch_adds_parcae_muon_and_routes_megatrons_muons():
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS

    from parcae_megatron.training import muon_optimizer

    megatron_patches.register_parcae_muon()
    assert _EMERGING_OPTIMIZERS["parcae_muon"].optimizer_cls is muon_optimizer.ParcaeMuon
    for name in ("muon", "adaptive_muon"):
        assert _EMERGING_OPTIMIZERS[name].default_param_overrides == \
            muon_optimizer.adamw_routing()
    for patch in (megatron_patches.TAG_BUFFER_ROUTING,
                  megatron_patches.TAG_BUFFER_ROUTING_TRAINING):
        owner, name = patch.owner()
        assert getattr(owner, name) is muon_optimizer.tag_params_for_buffer_routing
        assert patch.original() is not muon_optimizer.tag_params_for_buffer_routing


def _megatron_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names
                      if a.name.split(".")[0] == "megatron"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.AST) -> str | None:
    """The name an attribute / item chain starts from (``a`` of ``a.b[c].d``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_megatron_is_patched_only_in_megatron_patches():
    """No assignment to an attribute (or item) of an imported Megatron module or class, no
    ``setattr`` on one, and no ``Patch`` record outside ``training/megatron_patches.py`` and
    the CPU backend."""
    allowed = {"parcae_megatron/training/megatron_patches.py",
               "parcae_megatron/platform/cpu_backend.py"}
    found = []
    for path in sorted([*ROOT.glob("parcae_megatron/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        tree = ast.parse(Path(path).read_text())
        if rel != "parcae_megatron/platform/patching.py" and any(
                isinstance(n, ast.ImportFrom) and n.module == "parcae_megatron.platform.patching"
                for n in ast.walk(tree)):
            found.append(f"{rel}: imports Patch")
        megatron = _megatron_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets = [t for t in node.targets if isinstance(t, (ast.Attribute, ast.Subscript))]
            elif isinstance(node, ast.AugAssign):
                targets = [node.target]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                targets = node.args[:1]
            else:
                continue
            if any(_root(t) in megatron for t in targets):
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"Megatron patched outside training/megatron_patches.py: {found}"


def test_sys_argv_is_written_in_one_place(monkeypatch):
    """``arguments.set_megatron_argv`` is the package's only writer of ``sys.argv``."""
    import sys

    from parcae_megatron.training.arguments import set_megatron_argv

    monkeypatch.setattr(sys, "argv", ["prog", "--old"])
    assert set_megatron_argv(["--hidden-size", "8"]) == ["prog", "--old"]
    assert sys.argv == ["prog", "--hidden-size", "8"]
    writers = []
    for path in sorted(ROOT.glob("parcae_megatron/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "argv"
                    and getattr(t.value, "id", None) == "sys" for t in node.targets):
                writers.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    assert len(writers) == 1 and writers[0].startswith("parcae_megatron/training/arguments.py")
