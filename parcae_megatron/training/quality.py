"""CORE and greedy samples while training, on the training ranks in the run's own layout.

Every ``--eval-core-interval`` steps CORE is scored with the functions ``evaluate core`` runs
(``evaluate/core.py`` and ``evaluate/core_runner.py``: bundle reading, prompts, spans, scoring,
aggregation); only the forward differs. Here it is Megatron's forward-only schedule over this
run's tensor / pipeline layout (the model as it trains, no conversion), logits gathered over
tensor parallelism, each task's items dealt round-robin to the data-parallel replicas and the
correct counts summed over the world. h₀ is the seeded table the exported model uses
(``seeded_state_table``), so a step's numbers equal ``evaluate core --seeds SEED`` on that
step's checkpoint. Every ``--sample-interval`` steps the replica holding the last rank writes
greedy continuations of ``SAMPLE_PROMPTS`` at T = μ_rec.

Training does not notice: the RNG states are restored, the loop statistics of the step put
back, the model returned to train mode, Megatron's interval timer and Parcae's step timer
paused (the pause is reported as the evaluation's wall time).
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parcae_megatron.training.telemetry import TELEMETRY

SAMPLE_PROMPTS = ("The capital of France is", "Once upon a time,",
                  "The meaning of life is", "In 1905, Albert Einstein")
# Prompts per forward: the gathered logits of one forward are prompts × length × vocabulary.
PROMPTS_PER_FORWARD = 16


class QualityDuringTraining:
    """CORE every ``--eval-core-interval`` steps and samples every ``--sample-interval``."""

    def __init__(self) -> None:
        self.core_interval = 0
        self.sample_interval = 0
        self._ready = False

    def configure(self, args) -> None:
        """Read the intervals (the bundle and tokenizer load at the first evaluation)."""
        self.core_interval = args.eval_core_interval
        self.sample_interval = args.sample_interval
        self._ready = False

    def due(self, iteration: int) -> tuple[bool, bool]:
        """Whether CORE / samples run after step ``iteration``."""
        return (bool(self.core_interval) and iteration % self.core_interval == 0,
                bool(self.sample_interval) and iteration % self.sample_interval == 0)

    def after_step(self, model_chunks: list, optimizer, iteration: int) -> None:
        """Called on every rank after each step (Megatron's post-step callbacks)."""
        core, samples = self.due(iteration)
        if not (core or samples):
            return
        self._setup()
        with paused_training(model_chunks, optimizer):
            if core:
                self._core(model_chunks, iteration)
            if samples:
                self._samples(model_chunks, iteration)

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        if self._ready:
            return
        from megatron.training import get_args

        from parcae_megatron.evaluate.core import load_task_specs, prepare_task
        from parcae_megatron.evaluate.core_runner import bos_encoder, load_bundle
        from parcae_megatron.evaluate.runner import load_hf_tokenizer

        args = get_args()
        self.tokenizer = load_hf_tokenizer(args.tokenizer_model, args.padded_vocab_size)
        self.encode = bos_encoder(self.tokenizer, args.padded_vocab_size)
        self.max_len = int(args.max_position_embeddings or args.seq_length)
        mu = args.mean_recurrence
        self.loops = sorted(set(args.eval_core_loops or [1, mu, 2 * mu]))
        if not args.num_recurrent_layers:  # a Transformer baseline: no loop to vary
            self.loops = [1]
        self.seed = args.eval_core_seed
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if torch.cuda.is_available() else torch.device("cpu"))
        from parcae_megatron.hf.loop_math import seeded_state_table

        self.h0_table = seeded_state_table(self.max_len, args.hidden_size, args.init_method_std,
                                           self.seed).to(self.device)
        self.specs, self.items = [], {}
        if self.core_interval:
            self.specs = load_task_specs(args.eval_core_tasks_yaml)
            data, self.baselines, _ = load_bundle(args.eval_core_bundle, self.specs,
                                                  args.eval_core_max_per_task or None)
            # Prompts depend on (task, seed) only: tokenized once for the whole run.
            self.items = {s.label: prepare_task(s, data[s.label], self.seed, self.encode,
                                                self.max_len) for s in self.specs}
        self._ready = True

    # ------------------------------------------------------------------ forward
    def logits(self, model_chunks: list, t: int, ids: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits [b, L, V] of ``ids`` at loop count ``t`` on the last pipeline
        stage (None elsewhere): one micro-batch through Megatron's forward-only schedule."""
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batch, length = ids.shape
        h0 = self.h0_table[:length].unsqueeze(1).expand(length, batch, -1)
        last = parallel_state.is_pipeline_last_stage()

        def step(data_iterator, model):
            out = model(next(data_iterator), num_iterations=t, initial_state=h0)
            if last:  # [b, L, V/TP] → [b, L, V]
                out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
            return out, None  # no loss function: the schedule keeps the output

        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([ids.to(self.device)]),
            model=model_chunks, num_microbatches=1, seq_length=length,
            micro_batch_size=batch, forward_only=True)
        return store[0] if last else None

    # ------------------------------------------------------------------ CORE
    def _core(self, model_chunks: list, iteration: int) -> None:
        from megatron.core import parallel_state
        from megatron.core.utils import get_model_config

        from parcae_megatron.evaluate.core import score_items
        from parcae_megatron.evaluate.core_runner import aggregate, result_record

        start = time.perf_counter()
        dp = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        # One rank per replica counts (the last stage's first TP rank; all TP ranks agree).
        counts_here = (parallel_state.is_pipeline_last_stage()
                       and parallel_state.get_tensor_model_parallel_rank() == 0)
        pad_to = (parallel_state.get_tensor_model_parallel_world_size()
                  if get_model_config(model_chunks[0]).sequence_parallel else 1)
        bos = self.tokenizer.bos_token_id
        counts = []
        for spec in self.specs:
            mine = self.items[spec.label][dp_rank::dp]
            for t in self.loops:
                correct = score_items(lambda ids, t=t: self.logits(model_chunks, t, ids), mine,
                                      PROMPTS_PER_FORWARD, pad_id=bos, device=self.device,
                                      pad_to=pad_to)
                counts.append(sum(correct) if counts_here else 0)
        total = torch.tensor(counts, dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(total)
        total = iter(total.cpu().tolist())
        done = {}
        for spec in self.specs:
            items = self.items[spec.label]
            mismatches = sum(i.prefix_mismatch for i in items)
            for t in self.loops:
                done[(spec.label, t, self.seed)] = result_record(
                    spec.label, t, self.seed, int(next(total)), len(items), mismatches)
        report = aggregate(done, self.specs, self.loops, [self.seed], self.baselines)
        elapsed = time.perf_counter() - start
        record: dict[str, Any] = {"type": "core", "iteration": iteration,
                                  "wall_time_s": elapsed, "seed": self.seed}
        for row in report["results"]:
            record[f"core_T{row['T']}"] = row["score"]
        for row in report["tasks"]:
            for t, cell in row["by_T"].items():
                record[f"{row['task']}_T{t}"] = cell["accuracy"]
        TELEMETRY.write(record, iteration)
        if _is_last_rank():
            scores = "  ".join(f"T={r['T']} {r['score']:.2f}" for r in report["results"])
            print(f"CORE at iteration {iteration}: {scores}  ({len(self.specs)} tasks, "
                  f"{elapsed:.1f} s)", flush=True)

    # ------------------------------------------------------------------ samples
    def _samples(self, model_chunks: list, iteration: int) -> None:
        from megatron.core import parallel_state
        from megatron.training import get_args

        # The replica holding the last rank (which writes) generates; the others wait.
        if parallel_state.get_data_parallel_rank() != \
                parallel_state.get_data_parallel_world_size() - 1:
            return
        mu, tokens = get_args().mean_recurrence, get_args().sample_tokens
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        record: dict[str, Any] = {"type": "samples", "iteration": iteration, "T": mu}
        for n, prompt in enumerate(SAMPLE_PROMPTS):
            ids = self.encode(prompt)
            prompt_length = len(ids)
            while len(ids) < min(self.max_len, prompt_length + tokens):
                logits = self.logits(model_chunks, mu, torch.tensor([ids]))
                token = torch.zeros(1, dtype=torch.long, device=self.device)
                if logits is not None:  # rows past the tokenizer's are padding
                    token[0] = logits[0, -1, :len(self.tokenizer)].argmax()
                if pp > 1:  # the last stage decides; every stage needs the token
                    dist.broadcast(token, parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
                ids.append(int(token))
                if int(token) == eos:
                    break
            text = self.tokenizer.decode(ids[prompt_length:], skip_special_tokens=True)
            record[f"prompt_{n}"], record[f"sample_{n}"] = prompt, text
        TELEMETRY.write(record, iteration)
        if _is_last_rank():
            for n in range(len(SAMPLE_PROMPTS)):
                print(f"sample at iteration {iteration}, T={mu}: {record[f'prompt_{n}']!r} → "
                      f"{record[f'sample_{n}']!r}", flush=True)


@contextmanager
def paused_training(model_chunks: list, optimizer):
    """Eval mode with training's state put aside: Megatron's interval timer stopped, the
    forward pre-hooks off (parameters synced, as for validation), every RNG state and the
    step's loop statistics saved and restored; the pause is left out of Parcae's step time."""
    from megatron.core.utils import unwrap_model
    from megatron.training import get_args, get_timers
    from megatron.training.training import (
        disable_forward_pre_hook,
        enable_forward_pre_hook,
        should_disable_forward_pre_hook,
    )

    args, timers = get_args(), get_timers()
    timers("interval-time").stop()
    hooks = should_disable_forward_pre_hook(args)
    if hooks:
        disable_forward_pre_hook(model_chunks, optimizer=optimizer)
    rng = rng_states()
    inners = [unwrap_model(m) for m in model_chunks]
    saved = [(m.pop_loop_stats(), m.record_state_stats) for m in inners]
    start = time.perf_counter()
    for m in model_chunks:
        m.eval()
    try:
        for m in inners:
            m.record_state_stats = False
        yield
    finally:
        for m in model_chunks:
            m.train()
        for m, (stats, record) in zip(inners, saved):
            m.loop_stats, m.record_state_stats = stats, record
        set_rng_states(rng)
        if hooks:
            enable_forward_pre_hook(model_chunks)
        if TELEMETRY.last_time is not None:
            TELEMETRY.last_time += time.perf_counter() - start
        timers("interval-time", log_level=0).start(barrier=True)


def rng_states() -> dict:
    """Python, NumPy, torch (CPU and CUDA) and Megatron's tracked RNG states."""
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states())}


def set_rng_states(states: dict) -> None:
    """Restore what ``rng_states`` saved."""
    from megatron.core import tensor_parallel

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


QUALITY = QualityDuringTraining()
