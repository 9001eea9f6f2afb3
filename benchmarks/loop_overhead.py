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
(e) Compaction at the 1.3B layer proportions, characterised over width and micro-batch: (b)
    on an 8/8/8-layer model (μ_rec = 8, μ_bwd = 4, Poisson depths) at widths d = 64, 256,
    512, 1024 and micro-batch 8 and 32, where the loop is most of the executed layers as in
    the real run. Each point reports masked/compact wall time beside the executed-iteration
    ratio and the fraction of the iteration saving that reaches wall time,
    (1 - 1/wall ratio) / (1 - 1/iteration ratio): 1 when time follows executed rows, 0 when
    dropping rows saves nothing, negative when compaction is slower.
    benchmarks/gpu_acceptance.py (g) times the same at the 1.3B width on a GPU.

Every timing interleaves its variants (A B A B …) after a warm-up round and reports the median
and min–max over ``--repeats`` rounds, ratios taken round by round (benchmarks/timing.py).

Usage: python benchmarks/loop_overhead.py [--quick] [--repeats N] [--parts abcde]
[--threads N] [--widths 64,256,512,1024] [--batches 8,32]. ``--quick`` keeps one point of (e)
(d = 256, micro-batch 8). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch
from loop_execution import compare_loop_execution
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from timing import interleave

from parcae_megatron.model import ParcaeConfig, ParcaeModel
from parcae_megatron.model.config import half_squared_relu
from parcae_megatron.model.depth import DepthSample
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.platform.dist import init_distributed

WIDTH = dict(hidden_size=256, num_attention_heads=4, kv_channels=64, ffn_hidden_size=1024)
VOCAB, SEQ = 4096, 128


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
    timings = interleave({
        "gpt": train_step(gpt, ids, labels, position_ids=None, attention_mask=None),
        "parcae": train_step(parcae, ids, labels, depths=full),
        "recipe": train_step(recipe, ids, labels, depths=truncated)}, repeats)
    return {"T": T, "executed_layers": executed, "micro_batch": batch, "seq": SEQ,
            **timings.flat({"gpt": "gpt_step_s", "parcae": "parcae_full_backprop_step_s",
                            "recipe": "parcae_recipe_step_s"}),
            **timings.ratio("parcae", "gpt").flat("parcae_over_gpt"),
            **timings.ratio("recipe", "gpt").flat("recipe_over_gpt")}


def bench_compaction(batch: int, repeats: int, layers: int = 1, width: int = 128,
                     seq: int = 64) -> dict:
    """Executed iterations and wall time of one forward + backward, compacted vs masked, on
    ``layers``/``layers``/``layers`` layers of width ``width`` at μ_rec = 8, μ_bwd = 4. Both
    modes see the same depth draws in each round."""
    cfg = ParcaeConfig(hidden_size=width, num_attention_heads=max(1, width // 64),
                       kv_channels=min(64, width), ffn_hidden_size=4 * width,
                       num_prelude_layers=layers, num_recurrent_layers=layers,
                       num_coda_layers=layers, mean_recurrence=8, mean_backprop_depth=4,
                       vocab_size=VOCAB, seq_length=seq, use_cpu_initialization=True)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    return {"layers": f"{layers}/{layers}/{layers}", "hidden_size": width, "micro_batch": batch,
            "seq": seq, **compare_loop_execution(model, ids, ids, repeats)}


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
    steps = interleave({"device": train_step(model, ids, ids, depths=depths),
                        "host": train_step(model, ids, ids, depths=depths, generator=host)},
                       repeats)
    shape = (256, 8, 1024)  # 1/16 of the 1.3B recipe's s·b·d (2048 · 8 · 2048)
    x = torch.empty(shape, device=device)

    def draw_on_device():
        model._depths_and_state(x, None, depths, None, None)

    def draw_on_host():
        model._depths_and_state(x, None, depths, None, torch.Generator().manual_seed(3))

    draws = interleave({"device": draw_on_device, "host": draw_on_host}, repeats)
    return {"device": str(device), "micro_batch": batch, "repeats": repeats,
            **steps.time("device").flat("step_device_h0_s"),
            **steps.time("host").flat("step_host_h0_s"),
            **steps.ratio("host", "device").flat("step_host_over_device"),
            "draw_shape": list(shape), **draws.time("device").flat("draw_device_s"),
            **draws.time("host").flat("draw_host_s"),
            **draws.ratio("host", "device").flat("draw_host_over_device")}


def _tp_worker(rank: int, port: int, batch: int, repeats: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(tensor_parallel=2)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
    depths = DepthSample.fixed(batch, 4, 2)
    steps = {}
    for sp in (False, True):
        cfg = ParcaeConfig(**WIDTH, num_prelude_layers=1, num_recurrent_layers=2,
                           num_coda_layers=1, mean_recurrence=4, mean_backprop_depth=2,
                           vocab_size=VOCAB, seq_length=SEQ, tensor_model_parallel_size=2,
                           sequence_parallel=sp)
        model = ParcaeModel(cfg, get_parcae_layer_local_spec())
        model.train()
        steps["sp" if sp else "no_sp"] = train_step(model, ids, ids, depths=depths)
    timings = interleave(steps, repeats)  # both ranks run the same order (collectives match)
    if rank == 0:
        results.put({**timings.flat({"no_sp": "tp2_step_s", "sp": "tp2_sp_step_s"}),
                     **timings.ratio("sp", "no_sp").flat("sp_over_no_sp")})
    torch.distributed.destroy_process_group()


def bench_tensor_parallel(batch: int, repeats: int) -> dict:
    """TP=2 step time with and without sequence parallelism (two spawned gloo ranks)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_tp_worker, args=(port, batch, repeats, results), nprocs=2)
    return {"micro_batch": batch, "seq": SEQ, **results.get()}


def print_compaction(row: dict) -> dict:
    """Print one compaction point as soon as it is measured (the sweep is long); return it."""
    print(f"{row['layers']} layers, d={row['hidden_size']:4d}, micro-batch "
          f"{row['micro_batch']:2d}: masked/compact iterations "
          f"{row['masked_over_compact_iterations']:.2f}, wall "
          f"{row['masked_over_compact_time']:.2f} [{row['masked_over_compact_time_min']:.2f}–"
          f"{row['masked_over_compact_time_max']:.2f}] (compact "
          f"{row['compact_s']:.2f} s, masked {row['masked_s']:.2f} s), saving reaching wall "
          f"{row['saving_reaching_wall']:.2f}", flush=True)
    return row


SWEEP_WIDTHS, SWEEP_BATCHES, SWEEP_SEQ = (64, 256, 512, 1024), (8, 32), 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 repeats and one point of the (e) sweep (smoke run)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per comparison (default 5, 2 with --quick)")
    parser.add_argument("--parts", default="abcde", help="which parts to run, e.g. 'e'")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--widths", default=",".join(map(str, SWEEP_WIDTHS)),
                        help="hidden sizes of the (e) sweep (multiples of 64)")
    parser.add_argument("--batches", default=",".join(map(str, SWEEP_BATCHES)),
                        help="micro-batch sizes of the (e) sweep")
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    try:
        widths = [int(w) for w in args.widths.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        widths = batches = []
    if (repeats < 1 or args.threads < 1 or not set(args.parts) <= set("abcde") or not args.parts
            or not widths or not batches or any(w < 64 or w % 64 for w in widths)
            or any(b < 1 for b in batches)):
        parser.exit(2, "error: --repeats and --threads must be >= 1, --parts a non-empty "
                       "subset of 'abcde', --widths multiples of 64 and --batches >= 1\n")
    torch.set_num_threads(args.threads)
    init_distributed()
    results: dict = {"benchmark": "loop_overhead", "threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                     "repeats": repeats}
    if "a" in args.parts:
        results["step_time"] = [bench_step_time(T, 4, repeats) for T in (2, 4)]
        for row in results["step_time"]:
            print(f"T={row['T']:2d} executed layers={row['executed_layers']:2d}  "
                  f"GPTModel {row['gpt_step_s'] * 1e3:7.1f} ms  Parcae (full bptt) "
                  f"{row['parcae_full_backprop_step_s'] * 1e3:7.1f} ms  ratio "
                  f"{row['parcae_over_gpt']:.3f} [{row['parcae_over_gpt_min']:.3f}–"
                  f"{row['parcae_over_gpt_max']:.3f}]  | recipe (k=T/2, VE) "
                  f"{row['recipe_over_gpt']:.3f}")
    if "b" in args.parts:
        results["compaction"] = [print_compaction(bench_compaction(b, repeats)) for b in (8, 32)]
    if "e" in args.parts:
        points = [(256, 8)] if args.quick else [(d, b) for d in widths for b in batches]
        results["compaction_1p3b_proportions"] = [
            print_compaction(bench_compaction(b, repeats, layers=8, width=d, seq=SWEEP_SEQ))
            for d, b in points]
    if "c" in args.parts:
        h0 = results["initial_state"] = bench_initial_state(4, repeats)
        print(f"h0 on {h0['device']}: step host-drawn/device-drawn "
              f"{h0['step_host_over_device']:.3f}; draw {h0['draw_shape']} device "
              f"{h0['draw_device_s'] * 1e3:.1f} ms, host+copy {h0['draw_host_s'] * 1e3:.1f} ms "
              f"(ratio {h0['draw_host_over_device']:.2f})")
    if "d" in args.parts:
        tp = results["tensor_parallel"] = bench_tensor_parallel(4, repeats)
        print(f"TP=2 step {tp['tp2_step_s'] * 1e3:.1f} ms, TP=2+SP "
              f"{tp['tp2_sp_step_s'] * 1e3:.1f} ms (SP/no-SP {tp['sp_over_no_sp']:.3f}; "
              "CPU gloo, for the record)")
    print(f"{results['threads']} threads, {results['cpus']} CPUs, 1-min load average at start "
          f"{results['load_average_1min']:.1f}; medians [min–max] over {repeats} interleaved "
          "rounds")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
