"""The authors' released checkpoint format ↔ our Hugging Face export.

Authors' format (docs/design.md §12): ``config.json`` with
their field names and ``"_class_name": "ParcaeConfig"``, and ``pytorch_model.bin``, a
``torch.save`` of the full state dict: the RoPE buffer ``freqs_cis``, ``transformer.*``,
``value_embeds.*`` and ``lm_head.weight`` (sharing storage with ``transformer.wte.weight``).
Our HF parameter names are theirs except for the recurrent block (``transformer.core_block.*``
there, ``transformer.recurrent.*`` here: ``rename_recurrent_keys``), so conversion is a check, that
rename and two choices:

* RoPE: the authors rotate adjacent channel pairs. Import keeps their weights untouched and
  sets ``rope_interleaved=True`` (bit-exact both ways); ``rope="rotate-half"`` instead permutes
  the rows of ``c_q``/``c_k`` inside each head (exact, q·k is unchanged). Export of a
  rotate-half model applies the inverse permutation.
* QK-norm eps: the authors use the fp32 machine epsilon; import sets ``qk_norm_eps`` to it.

Injection types follow the registry (``hf/loop_math.py``): the authors' ``diagonal``,
``linear`` and ``add`` are our ``diagonal``, ``concat_linear`` and ``additive``. ``linear``'s
one matrix ``transformer.adapter.adapter.weight`` [d, 2d] acts on [h; e] (state first) exactly
like our ``transformer.adapter.weight``, so it is renamed, never reshaped.

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from data_prep.tokenizer import SentencePieceTokenizer, load_tokenizer, resolve_tokenizer
from parcae_megatron.convert.errors import ConversionError
from parcae_megatron.convert.hf_io import (
    build_hf_model,
    load_hf_model,
    prepare_output,
    publish,
    write_hf_dir,
)
from parcae_megatron.hf.configuration_parcae import ParcaeConfig
from parcae_megatron.hf.loop_math import INJECTIONS, injection
from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM, rename_recurrent_keys
from parcae_megatron.hf.tokenization_parcae import check_sentencepiece

CLASS_NAME = "ParcaeConfig"
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "model.pt", "model.bin")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
FP32_EPS = float(torch.finfo(torch.float32).eps)
GATE_CHANNELS = 32
# state_dict order of the authors' model: buffer, transformer stages, VE tables, head.
_GROUP_ORDER = ("freqs_cis", "transformer.wte.", "transformer.prelude.", "transformer.adapter.",
                "transformer.core_block.", "transformer.C.", "transformer.coda.",
                "transformer.ln_f.", "transformer.ln_prelude.", "value_embeds.", "lm_head.")


class OfficialFormatError(ConversionError, ValueError):
    """A checkpoint or config that cannot be converted exactly."""


# -- shared rules ------------------------------------------------------------------------------
def value_embedding_layout(n_p: int, n_r: int, n_c: int, mean_recurrence: int,
                           mean_backprop_depth: int) -> tuple[list[str], list[str]]:
    """(layers owning a VE table, layers owning a ``ve_gate``) under the authors' two rules.

    Tables: effective index n ∈ [0, L_P+L_R+L_C) with n ≡ n_eff−1 (mod 2). Gates: internal
    ``layer_id`` (prelude i; recurrent L_P+j; coda L_P+L_R·μ_rec+k) ≡ L_R·μ_bwd − 1 (mod 2).
    Layers are named ``prelude.i`` / ``recurrent.j`` / ``coda.k``.
    """
    names = ([f"prelude.{i}" for i in range(n_p)] + [f"recurrent.{j}" for j in range(n_r)]
             + [f"coda.{k}" for k in range(n_c)])
    n_eff = n_p + n_r + n_c
    tables = [names[n] for n in range(n_eff) if n % 2 == (n_eff - 1) % 2]
    layer_ids = (list(range(n_p)) + [n_p + j for j in range(n_r)]
                 + [n_p + n_r * mean_recurrence + k for k in range(n_c)])
    parity = (n_r * mean_backprop_depth - 1) % 2
    gates = [name for name, lid in zip(names, layer_ids) if lid % 2 == parity]
    return tables, gates


def check_value_embedding_rules(n_p: int, n_r: int, n_c: int, mean_recurrence: int,
                                mean_backprop_depth: int) -> None:
    """Raise unless the authors' table and gate rules pick the same layers (docs/design.md §12.4).

    They disagree for some odd stage sizes; the authors' model then has unused tables and
    gates, which our model (a gate exactly where a table is) cannot represent.
    """
    tables, gates = value_embedding_layout(n_p, n_r, n_c, mean_recurrence, mean_backprop_depth)
    if tables != gates:
        raise OfficialFormatError(
            f"stage sizes {n_p}/{n_r}/{n_c} with mean_recurrence={mean_recurrence}, "
            f"mean_backprop_depth={mean_backprop_depth}: the authors' value-embedding tables "
            f"({', '.join(tables) or 'none'}) and gates ({', '.join(gates) or 'none'}) are on "
            f"different layers; only layouts where they agree (e.g. even stage sizes) convert")


def freqs_cis(block_size: int, head_dim: int, base: float) -> torch.Tensor:
    """The authors' RoPE buffer [1, block_size, 1, head_dim/2, 2] (cos, sin), fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(block_size, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.stack((angles.cos(), angles.sin()), dim=-1)[None, :, None]


def rope_row_index(heads: int, head_dim: int, to_interleaved: bool) -> torch.Tensor:
    """Row index for ``c_q``/``c_k`` weights [heads·head_dim, d] switching RoPE convention.

    Rotate-half pairs channel i with i + hd/2; interleaved pairs 2i with 2i+1. So
    interleaved row 2i = rotate-half row i and interleaved row 2i+1 = rotate-half row hd/2+i.
    """
    half = head_dim // 2
    if to_interleaved:
        per_head = torch.stack((torch.arange(half), torch.arange(half) + half), 1).flatten()
    else:
        per_head = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return (torch.arange(heads)[:, None] * head_dim + per_head[None, :]).flatten()


def _permute_qk(state: dict[str, torch.Tensor], cfg: ParcaeConfig, to_interleaved: bool) -> None:
    q_idx = rope_row_index(cfg.num_attention_heads, cfg.head_dim, to_interleaved)
    k_idx = rope_row_index(cfg.num_key_value_heads, cfg.head_dim, to_interleaved)
    for key in list(state):
        if key.endswith("attn.c_q.weight"):
            state[key] = state[key][q_idx].contiguous()
        elif key.endswith("attn.c_k.weight"):
            state[key] = state[key][k_idx].contiguous()


# -- injection types ---------------------------------------------------------------------------
OFFICIAL_INJECTIONS = {kind.official_name: name for name, kind in INJECTIONS.items()
                       if kind.official_name is not None}
"""The authors' ``injection_type`` → ours."""
_ADAPTER = "transformer.adapter."


def _adapter_keys(injection_type: str) -> dict[str, str]:
    """Our HF adapter key → the authors' key, for ``injection_type`` (ours)."""
    return {_ADAPTER + ours: _ADAPTER + theirs
            for ours, theirs in INJECTIONS[injection_type].official_keys.items()}


def _rename(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    return {names.get(k, k): v for k, v in state.items()}


# -- config mapping ----------------------------------------------------------------------------
def official_config(cfg: ParcaeConfig, name: str = "parcae") -> dict:
    """The authors' ``config.json`` for an HF ``ParcaeConfig``; raises if it cannot express it."""
    problems = []
    official_injection = injection(cfg.injection_type).official_name
    if official_injection is None:
        problems.append(f"injection_type={cfg.injection_type!r} (the authors' format: "
                        f"{', '.join(map(repr, OFFICIAL_INJECTIONS.values()))})")
    if not cfg.num_recurrent_layers:
        problems.append("no recurrent layers")
    if not cfg.value_embeddings:
        problems.append("value_embeddings=False")
    if cfg.value_embedding_gate_channels != GATE_CHANNELS:
        problems.append(f"value_embedding_gate_channels={cfg.value_embedding_gate_channels} "
                        f"(authors: {GATE_CHANNELS})")
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        problems.append(f"heads·head_dim = {cfg.num_attention_heads * cfg.head_dim} ≠ "
                        f"hidden_size {cfg.hidden_size} (authors derive head_dim = d / heads)")
    if cfg.state_init != "like-init":
        problems.append(f"state_init={cfg.state_init!r}")
    if not cfg.tie_word_embeddings:
        problems.append("untied embeddings")
    if problems:
        raise OfficialFormatError("cannot express this model in the authors' format: "
                                  + "; ".join(problems))
    check_value_embedding_rules(cfg.num_prelude_layers, cfg.num_recurrent_layers,
                                cfg.num_coda_layers, cfg.mean_recurrence,
                                cfg.mean_backprop_depth)
    v = cfg.vocab_size
    return {
        "name": name,
        "block_size": cfg.max_position_embeddings,
        "vocab_size": v,
        "padding_multiple": 64 if v % 64 == 0 else 1,
        "padded_vocab_size": v,
        "n_embd": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
        "n_layers_in_prelude": cfg.num_prelude_layers,
        "n_layers_in_recurrent_block": cfg.num_recurrent_layers,
        "n_layers_in_coda": cfg.num_coda_layers,
        "recurrent_embedding_dimension": cfg.hidden_size,
        "recurrent_intermediation_embedding_dimension": cfg.intermediate_size,
        "recurrent_num_attention_heads": None,
        "mean_recurrence": cfg.mean_recurrence,
        "mean_backprop_depth": cfg.mean_backprop_depth,
        "rope_settings": {"use_rope": True, "rope_base": cfg.rope_theta,
                          "rope_condense_ratio": 1},
        "norm_class_name": "RMSNorm",
        "norm_eps": cfg.rms_norm_eps,
        "mlp_class_name": "BaseMLP",
        "nonlin_name": "ReLU2",
        "block_class_name": "TransformerPreNormBlock",
        "qk_norm": True,
        "qk_bias": False,
        "clip_qkv": None,
        "bias": False,
        "tie_embeddings": True,
        "prelude_norm": bool(cfg.prelude_norm),
        "injection_type": official_injection,
        "state_init": "like-init",
        "init_strategy": "scaled-zero",
        "init_orthogonal": True,
        "logit_softcap": None,
        "use_fused_head": "pytorch",
        "sampling_scheme": "poisson-truncated-full",
        "recurrent_iteration_method": "per-sequence",
        "mup_model_scaling_factor": 1,
        "_class_name": CLASS_NAME,
    }


def _require(raw: dict, key: str):
    if key not in raw or raw[key] is None:
        raise OfficialFormatError(f"config.json: required field {key!r} is missing")
    return raw[key]


def hf_config_from_official(raw: dict, *, rope_interleaved: bool = True,
                            state_seed: int | None = 0,
                            qk_norm_eps: float = FP32_EPS) -> ParcaeConfig:
    """Our HF config for the authors' ``config.json`` dict; rejects what we cannot run exactly.

    ``qk_norm_eps`` defaults to the authors' value (fp32 machine epsilon); Megatron's QK-norm
    uses the block norms' eps, so pass ``norm_eps`` (1e-5) for a model headed to Megatron.
    """
    if raw.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise OfficialFormatError(f"config.json: _class_name is {raw['_class_name']!r}, "
                                  f"expected {CLASS_NAME!r} (not a Parcae checkpoint)")
    d = int(_require(raw, "n_embd"))
    heads = int(_require(raw, "num_attention_heads"))
    kv = int(raw.get("num_key_value_heads") or heads)
    inner = int(_require(raw, "intermediate_size"))
    expect = {"recurrent_embedding_dimension": (d, None),
              "recurrent_intermediation_embedding_dimension": (inner, None),
              "recurrent_num_attention_heads": (heads, None),
              "injection_type": tuple(OFFICIAL_INJECTIONS), "tie_embeddings": (True,),
              "norm_class_name": ("RMSNorm",), "mlp_class_name": ("BaseMLP",),
              "nonlin_name": ("ReLU2",), "qk_norm": (True,), "qk_bias": (False, None),
              "bias": (False, None), "clip_qkv": (None,), "logit_softcap": (None,),
              "mup_model_scaling_factor": (1, 1.0, None), "state_init": ("like-init",)}
    bad = [f"{k}={raw[k]!r} (supported: {', '.join(map(repr, ok))})"
           for k, ok in expect.items() if k in raw and raw[k] not in ok]
    rope = raw.get("rope_settings") or {}
    if not rope.get("use_rope", True) or rope.get("rope_condense_ratio", 1) != 1:
        bad.append(f"rope_settings={rope!r} (supported: use_rope, condense ratio 1)")
    if d % heads:
        bad.append(f"n_embd={d} is not a multiple of num_attention_heads={heads}")
    if bad:
        raise OfficialFormatError("config.json: unsupported settings: " + "; ".join(bad))
    n_p, n_r, n_c = (int(_require(raw, k)) for k in (
        "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda"))
    mu, mu_bwd = int(_require(raw, "mean_recurrence")), int(_require(raw, "mean_backprop_depth"))
    check_value_embedding_rules(n_p, n_r, n_c, mu, mu_bwd)
    vocab = raw.get("padded_vocab_size")
    if vocab is None:
        multiple = int(raw.get("padding_multiple") or 1)
        vocab = math.ceil(int(_require(raw, "vocab_size")) / multiple) * multiple
    return ParcaeConfig(
        vocab_size=int(vocab), hidden_size=d, intermediate_size=inner,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=d // heads,
        num_prelude_layers=n_p, num_recurrent_layers=n_r, num_coda_layers=n_c,
        mean_recurrence=mu, mean_backprop_depth=mu_bwd,
        injection_type=OFFICIAL_INJECTIONS[raw.get("injection_type", "diagonal")],
        prelude_norm=bool(raw.get("prelude_norm", True)), state_init="like-init",
        state_seed=state_seed, value_embeddings=True,
        value_embedding_gate_channels=GATE_CHANNELS,
        rms_norm_eps=float(raw.get("norm_eps", 1e-5)), qk_norm_eps=qk_norm_eps,
        rope_theta=float(rope.get("rope_base", 50000.0)), rope_interleaved=rope_interleaved,
        max_position_embeddings=int(_require(raw, "block_size")), tie_word_embeddings=True)


# -- files -------------------------------------------------------------------------------------
def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _find_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config.json, weights file) for a checkpoint directory or a weights file."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: no weights file (looked for "
                                    f"{', '.join(WEIGHT_FILES)})")
        config = path / "config.json"
    elif path.is_file():
        weights, config = path, path.parent / "config.json"
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found (the authors' format keeps config.json "
                                f"next to the weights)")
    return config, weights


def load_official(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the authors' ``config.json`` and state dict (wrapper prefixes stripped).

    Pickled files are read with ``torch.load(weights_only=True)``; a training checkpoint's
    ``{"model": state_dict, ...}`` is accepted.
    """
    config_path, weights = _find_files(path)
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OfficialFormatError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise OfficialFormatError(f"{config_path}: expected a JSON object")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or truncated file, or a pickle with arbitrary objects
        raise OfficialFormatError(f"{weights}: cannot read weights ({type(err).__name__}: "
                                  f"{err})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise OfficialFormatError(f"{weights}: not a state dict of tensors")
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _strip_prefixes(key)
        if name in stripped:
            raise OfficialFormatError(f"{weights}: key {name!r} appears twice after removing "
                                      f"wrapper prefixes")
        stripped[name] = value
    return raw, stripped


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_state(state: dict[str, torch.Tensor], model: ParcaeForCausalLM,
                 cfg: ParcaeConfig, source: str) -> None:
    """Strict key and shape comparison with the model ``cfg`` describes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        parts = ([f"missing keys: {_listing(missing)}"] if missing else []) + (
            [f"unexpected keys: {_listing(unexpected)}"] if unexpected else [])
        raise OfficialFormatError(f"{source}: weights do not match config.json "
                                  f"({'; '.join(parts)})")
    shapes = [f"{k}: file {tuple(state[k].shape)}, config {shape}"
              for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if shapes:
        raise OfficialFormatError(f"{source}: shape mismatch: {_listing(shapes, 6)}")


# -- import / export ---------------------------------------------------------------------------
def official_to_hf_model(path: str | os.PathLike, *, rope: str = "interleaved",
                         state_seed: int | None = 0,
                         qk_norm_eps: float = FP32_EPS) -> ParcaeForCausalLM:
    """Build our ``ParcaeForCausalLM`` from an authors' checkpoint (strictly checked)."""
    if rope not in ("interleaved", "rotate-half"):
        raise ValueError(f"rope must be 'interleaved' or 'rotate-half', got {rope!r}")
    raw, state = load_official(path)
    cfg = hf_config_from_official(raw, rope_interleaved=rope == "interleaved",
                                  state_seed=state_seed, qk_norm_eps=qk_norm_eps)
    wte, head = state.get("transformer.wte.weight"), state.pop("lm_head.weight", None)
    if wte is None and head is not None:
        state["transformer.wte.weight"] = wte = head
    if wte is not None and head is not None and not (
            wte.shape == head.shape and torch.equal(wte, head)):
        raise OfficialFormatError(f"{path}: lm_head.weight differs from transformer.wte.weight; "
                                  f"the authors' model ties them (their loader would keep "
                                  f"lm_head), refusing to guess")
    table = state.pop("freqs_cis", None)
    if table is not None:
        want = freqs_cis(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
        if tuple(table.shape) != tuple(want.shape):
            raise OfficialFormatError(f"{path}: freqs_cis has shape {tuple(table.shape)}, "
                                      f"config implies {tuple(want.shape)}")
        # bf16-saved tables are rounded (≈2e-3); a wrong rope_base is off by O(1).
        tol = 1e-5 if table.dtype == torch.float32 else 1e-2
        err = (table.float() - want).abs().max().item()
        if err > tol:
            raise OfficialFormatError(f"{path}: freqs_cis differs from the table for "
                                      f"rope_base={cfg.rope_theta} by {err:.3g}")
    dtype = wte.dtype if wte is not None else torch.float32
    state = _rename(state, {v: k for k, v in _adapter_keys(cfg.injection_type).items()})
    state = rename_recurrent_keys(state)
    with torch.device("meta"):
        shell = ParcaeForCausalLM(cfg)
    _check_state(state, shell, cfg, str(path))
    if rope == "rotate-half":
        _permute_qk(state, cfg, to_interleaved=False)
    cfg.dtype = dtype
    state["lm_head.weight"] = state["transformer.wte.weight"]
    # Built on the meta device and filled in place: no throwaway random init.
    return build_hf_model(cfg, state, dtype)


def import_official(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                    overwrite: bool = False, rope: str = "interleaved",
                    state_seed: int | None = 0, tokenizer_model: str | None = None,
                    qk_norm_eps: float = FP32_EPS) -> Path:
    """Convert an authors' checkpoint (dir or weights file) into an HF directory ``out_dir``."""
    prepare_output(Path(out_dir), overwrite)  # fail before the (slow) load
    out = Path(out_dir)
    if tokenizer_model and not Path(tokenizer_model).exists():
        raise FileNotFoundError(f"tokenizer not found: {tokenizer_model}")
    if tokenizer_model:  # BOS checked before the (slow) load; the vocabulary size after it
        try:
            kind, tokenizer_file = resolve_tokenizer(tokenizer_model)
            if kind == SentencePieceTokenizer.kind:
                check_sentencepiece(tokenizer_file)
            else:
                load_tokenizer(tokenizer_file)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConversionError(str(exc).splitlines()[0]) from exc
    model = official_to_hf_model(path, rope=rope, state_seed=state_seed, qk_norm_eps=qk_norm_eps)
    return write_hf_dir(model, out, Path(tokenizer_model) if tokenizer_model else None,
                        overwrite=True)


def official_state_dict(model: ParcaeForCausalLM) -> dict[str, torch.Tensor]:
    """The authors' state dict (their key order; ``lm_head`` shares ``wte``'s storage)."""
    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not cfg.rope_interleaved:
        _permute_qk(state, cfg, to_interleaved=True)
    state = rename_recurrent_keys(_rename(state, _adapter_keys(cfg.injection_type)),
                                  to_authors=True)
    state["freqs_cis"] = freqs_cis(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
    state["lm_head.weight"] = state["transformer.wte.weight"]

    def rank(key: str) -> int:
        return next(i for i, p in enumerate(_GROUP_ORDER) if key.startswith(p))

    return dict(sorted(state.items(), key=lambda kv: rank(kv[0])))  # stable within groups


def export_official(source: str | os.PathLike | ParcaeForCausalLM, out_dir: str | os.PathLike,
                    *, overwrite: bool = False, name: str | None = None) -> Path:
    """Write ``config.json`` + ``pytorch_model.bin`` in the authors' format.

    ``source`` is an HF export directory or a ``ParcaeForCausalLM``.
    """
    out = Path(out_dir)
    tmp = prepare_output(out, overwrite)
    model = source if isinstance(source, ParcaeForCausalLM) else load_hf_model(Path(source))
    config = official_config(model.config, name or out.name)
    state = official_state_dict(model)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        torch.save(state, tmp / "pytorch_model.bin")
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- CLI ---------------------------------------------------------------------------------------
def _seed(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def add_official_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``official-import`` and ``official-export``; each sets ``handler`` (args → exit)."""
    imp = subparsers.add_parser(
        "official-import", help="authors' checkpoint (config.json + pytorch_model.bin / "
                                "model.safetensors / model.pt) → HF directory")
    imp.add_argument("checkpoint", help="directory with config.json and weights, or the "
                                        "weights file itself")
    imp.add_argument("--out", required=True, help="HF output directory")
    imp.add_argument("--rope", choices=("interleaved", "rotate-half"), default="interleaved",
                     help="keep the authors' interleaved RoPE (default, bit-exact) or permute "
                          "c_q/c_k rows to rotate-half (Megatron's convention)")
    imp.add_argument("--state-seed", type=_seed, default=0,
                     help="seed of the initial state h0 in the exported config; 'none' draws a "
                          "fresh h0 every forward like the authors (default 0)")
    imp.add_argument("--tokenizer", help="tokenizer to export with the model: a Hugging Face "
                                          "tokenizer.json (the authors' release) or its "
                                          "directory, or a SentencePiece .model")
    imp.add_argument("--qk-norm-eps", type=float, default=FP32_EPS,
                     help="QK-norm epsilon (default: the authors' fp32 machine epsilon; use "
                          "1e-5 if the model goes on to Megatron with from-hf)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imp.set_defaults(handler=cmd_official_import)
    exp = subparsers.add_parser("official-export",
                                help="HF directory → authors' format (config.json + "
                                     "pytorch_model.bin)")
    exp.add_argument("hf_dir", help="HF export directory")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--name", help="the config's name field (default: output directory name)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    exp.set_defaults(handler=cmd_official_export)


def _run(fn, *args, **kwargs) -> int:
    try:
        out = fn(*args, **kwargs)
    except (ConversionError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def cmd_official_import(args: argparse.Namespace) -> int:
    """Handler of ``official-import``."""
    return _run(import_official, args.checkpoint, args.out, overwrite=args.overwrite,
                rope=args.rope, state_seed=args.state_seed, tokenizer_model=args.tokenizer,
                qk_norm_eps=args.qk_norm_eps)


def cmd_official_export(args: argparse.Namespace) -> int:
    """Handler of ``official-export``."""
    return _run(export_official, args.hf_dir, args.out, overwrite=args.overwrite,
                name=args.name)
