"""Loop overhead of ParcaeModel, measured on the CPU backend.

(a) Training-step time (forward + backward) of a Parcae model at a fixed depth T with full
    backprop against a Megatron ``GPTModel`` of the same width with the same number of executed
    layers (L_P + T·L_R + L_C), both without value embeddings; ratio printed. Also the Parcae
    step with its real recipe (truncated backprop, value embeddings) for reference.
(b) Executed recurrent iterations per sequence divided by the mean sampled depth, with
    compaction and with the authors' masking, at micro-batch 8 and 32 (Poisson μ_rec = 8),
    counted by the model itself over real forward passes, plus the wall-time ratio.
(c) The initial loop state h₀: training-step time of one model with h₀ drawn on its device
    (the default: the replica's device generator) against drawn on the host and copied (a
    CPU generator passed in), and the draw alone at 1/16 of the 1.3B recipe's s·b·d. On the CPU
    backend host and device are the same memory, so the ratio is ~1 here; the GPU figure
    comes with the GPU acceptance run.
(d) Tensor parallelism: a training step (forward + backward) at TP=2 with and without
    sequence parallelism, two gloo ranks spawned by this script (CPU figures, for the
    record: gloo collectives on 2 cores say nothing about NVLink).
(e) Compaction at the 1.3B layer proportions: (b) on an 8/8/8-layer model (μ_rec = 8,
    μ_bwd = 4, Poisson depths, micro-batch 8) at a small width, where the loop is most of the
    executed layers as in the real run; the 1/1/1 model of (b) is dominated by prelude, coda
    and logits and understates what compaction saves. benchmarks/gpu_acceptance.py (g) times
    the same at the 1.3B width on a GPU.

Usage: python benchmarks/loop_overhead.py [--quick]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from parcae_megatron.model import ParcaeConfig, ParcaeModel
from parcae_megatron.model.config import half_squared_relu
from parcae_megatron.model.depth import DepthSample
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.platform.dist import init_distributed

WIDTH = dict(hidden_size=256, num_attention_heads=4, kv_channels=64, ffn_hidden_size=1024)
VOCAB, SEQ = 4096, 128


def step_time(fn, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train_step(model, ids, labels, **kwargs):
    def run():
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels, **kwargs).mean().backward()
    return run


def bench_step_time(T: int, batch: int, repeats: int) -> dict:
    parcae_cfg = ParcaeConfig(**WIDTH, num_prelude_layers=1, num_recurrent_layers=2,
                              num_coda_layers=1, mean_recurrence=T, mean_backprop_depth=T,
                              value_embeddings=False, vocab_size=VOCAB, seq_length=SEQ,
                              use_cpu_initialization=True)
    executed = 2 + 2 * T
    gpt_cfg = TransformerConfig(**WIDTH, num_layers=executed, normalization="RMSNorm",
                                add_bias_linear=False, activation_func=half_squared_relu,
                                hidden_dropout=0.0, attention_dropout=0.0,
                                bias_activation_fusion=False, bias_dropout_fusion=False,
                                masked_softmax_fusion=False, apply_rope_fusion=False,
                                persist_layer_norm=False, use_cpu_initialization=True)
    gpt = GPTModel(gpt_cfg, get_gpt_layer_local_spec(normalization="RMSNorm"),
                   vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                   share_embeddings_and_output_weights=True)
    parcae = ParcaeModel(parcae_cfg, get_parcae_layer_local_spec())
    recipe_cfg = ParcaeConfig(**WIDTH, num_prelude_layers=1, num_recurrent_layers=2,
                              num_coda_layers=1, mean_recurrence=T,
                              mean_backprop_depth=max(1, T // 2), vocab_size=VOCAB,
                              seq_length=SEQ, use_cpu_initialization=True)
    recipe = ParcaeModel(recipe_cfg, get_parcae_layer_local_spec())
    for m in (gpt, parcae, recipe):
        m.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    full = DepthSample.fixed(batch, T, T)
    truncated = DepthSample.fixed(batch, T, max(1, T // 2))
    t_gpt = step_time(train_step(gpt, ids, labels, position_ids=None, attention_mask=None),
                      repeats)
    t_parcae = step_time(train_step(parcae, ids, labels, depths=full), repeats)
    t_recipe = step_time(train_step(recipe, ids, labels, depths=truncated), repeats)
    return {"T": T, "executed_layers": executed, "micro_batch": batch, "seq": SEQ,
            "gpt_step_s": t_gpt, "parcae_full_backprop_step_s": t_parcae,
            "parcae_over_gpt": t_parcae / t_gpt,
            "parcae_recipe_step_s": t_recipe, "recipe_over_gpt": t_recipe / t_gpt}


def bench_compaction(batch: int, microbatches: int, layers: int = 1) -> dict:
    """Executed iterations and wall time, compacted vs masked, on ``layers``/``layers``/
    ``layers`` layers at μ_rec = 8, μ_bwd = 4, over ``microbatches`` forward + backward."""
    seq = 64
    cfg = ParcaeConfig(hidden_size=128, num_attention_heads=2, kv_channels=64,
                       ffn_hidden_size=512, num_prelude_layers=layers,
                       num_recurrent_layers=layers, num_coda_layers=layers, mean_recurrence=8,
                       mean_backprop_depth=4, vocab_size=VOCAB, seq_length=seq,
                       use_cpu_initialization=True)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    out = {"layers": f"{layers}/{layers}/{layers}", "micro_batch": batch}
    model(ids, labels=ids).mean().backward()  # warm-up: first calls must not count for one mode
    for mode in ("compact", "masked"):
        cfg.loop_execution = mode
        model.depth_sampler.start_step(0)  # same draws for both modes
        model.pop_loop_stats()
        start = time.perf_counter()
        for _ in range(microbatches):
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).mean().backward()
        elapsed = time.perf_counter() - start
        stats = model.pop_loop_stats()
        mean_depth = stats.sampled_iterations / stats.sequences
        out[f"{mode}_executed_per_sequence"] = stats.executed_iterations / stats.sequences
        out[f"{mode}_over_mean_depth"] = stats.executed_iterations / stats.sampled_iterations
        out[f"{mode}_s"] = elapsed
        out["mean_sampled_depth"] = mean_depth
    out["masked_over_compact_time"] = out["masked_s"] / out["compact_s"]
    return out


def bench_initial_state(batch: int, repeats: int) -> dict:
    """Step time with h0 drawn on the model's device vs on the host, same model and depths."""
    cfg = ParcaeConfig(**WIDTH, num_prelude_layers=1, num_recurrent_layers=2, num_coda_layers=1,
                       mean_recurrence=4, mean_backprop_depth=2, vocab_size=VOCAB,
                       seq_length=SEQ)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    model.train()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen).to(device)
    depths = DepthSample.fixed(batch, 4, 2)
    host = torch.Generator()
    t_device = step_time(train_step(model, ids, ids, depths=depths), repeats)
    t_host = step_time(train_step(model, ids, ids, depths=depths, generator=host), repeats)
    shape = (256, 8, 1024)  # 1/16 of the 1.3B recipe's s·b·d (2048 · 8 · 2048)
    x = torch.empty(shape, device=device)

    def draw_on_device():
        model._depths_and_state(x, None, depths, None, None)

    def draw_on_host():
        model._depths_and_state(x, None, depths, None, torch.Generator().manual_seed(3))

    draw_device, draw_host = step_time(draw_on_device, repeats), step_time(draw_on_host, repeats)
    return {"device": str(device), "micro_batch": batch, "step_device_h0_s": t_device,
            "step_host_h0_s": t_host, "step_host_over_device": t_host / t_device,
            "draw_shape": list(shape), "draw_device_s": draw_device, "draw_host_s": draw_host,
            "draw_host_over_device": draw_host / draw_device}


def _tp_worker(rank: int, port: int, batch: int, repeats: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(tensor_parallel=2)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    depths = DepthSample.fixed(batch, 4, 2)
    out = {}
    for sp in (False, True):
        cfg = ParcaeConfig(**WIDTH, num_prelude_layers=1, num_recurrent_layers=2,
                           num_coda_layers=1, mean_recurrence=4, mean_backprop_depth=2,
                           vocab_size=VOCAB, seq_length=SEQ, tensor_model_parallel_size=2,
                           sequence_parallel=sp)
        model = ParcaeModel(cfg, get_parcae_layer_local_spec())
        model.train()
        out["tp2_sp_step_s" if sp else "tp2_step_s"] = step_time(
            train_step(model, ids, ids, depths=depths), repeats)
    if rank == 0:
        results.put(out)
    torch.distributed.destroy_process_group()


def bench_tensor_parallel(batch: int, repeats: int) -> dict:
    """TP=2 step time with and without sequence parallelism (two spawned gloo ranks)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_tp_worker, args=(port, batch, repeats, results), nprocs=2)
    out = results.get()
    return {"micro_batch": batch, "seq": SEQ, **out,
            "sp_over_no_sp": out["tp2_sp_step_s"] / out["tp2_step_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    init_distributed()
    repeats = 2 if args.quick else 5
    results = {"step_time": [bench_step_time(T, 4, repeats) for T in (2, 4)],
               "compaction": [bench_compaction(b, 4 if args.quick else 16) for b in (8, 32)],
               "compaction_1p3b_proportions": bench_compaction(8, 2 if args.quick else 6, 8),
               "initial_state": bench_initial_state(4, repeats),
               "tensor_parallel": bench_tensor_parallel(4, repeats)}
    for row in results["step_time"]:
        print(f"T={row['T']:2d} executed layers={row['executed_layers']:2d}  "
              f"GPTModel {row['gpt_step_s'] * 1e3:7.1f} ms  Parcae (full bptt) "
              f"{row['parcae_full_backprop_step_s'] * 1e3:7.1f} ms  ratio "
              f"{row['parcae_over_gpt']:.3f}  | recipe (k=T/2, VE) "
              f"{row['recipe_over_gpt']:.3f}")
    for row in [*results["compaction"], results["compaction_1p3b_proportions"]]:
        print(f"{row['layers']} layers, micro-batch {row['micro_batch']:2d}: mean depth "
              f"{row['mean_sampled_depth']:.2f}; "
              f"executed/mean compact {row['compact_over_mean_depth']:.3f}, "
              f"masked {row['masked_over_mean_depth']:.3f}; "
              f"masked/compact time {row['masked_over_compact_time']:.2f}")
    h0 = results["initial_state"]
    print(f"h0 on {h0['device']}: step host-drawn/device-drawn {h0['step_host_over_device']:.3f}; "
          f"draw {h0['draw_shape']} device {h0['draw_device_s'] * 1e3:.1f} ms, host+copy "
          f"{h0['draw_host_s'] * 1e3:.1f} ms (ratio {h0['draw_host_over_device']:.2f})")
    tp = results["tensor_parallel"]
    print(f"TP=2 step {tp['tp2_step_s'] * 1e3:.1f} ms, TP=2+SP {tp['tp2_sp_step_s'] * 1e3:.1f} ms "
          f"(SP/no-SP {tp['sp_over_no_sp']:.3f}; CPU gloo, for the record)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
