"""The GPT dataset config of a Parcae run, from Megatron's data flags.

megatron-core's wheel ships no ``pretrain_gpt.py`` (where Megatron-LM builds this config), so
the mapping lives here: every data flag of Megatron-LM's GPT pretraining is carried over.
The flags ParcaeModel cannot honour (--reset-position-ids, --reset-attention-mask,
--dataloader-inter-document-masking) are refused in ``flag_policy`` before a rank starts.
"""

from __future__ import annotations

import argparse
import json


def gpt_dataset_config_from_args(args: argparse.Namespace, tokenizer, config_class=None,
                                 **extra):
    """``GPTDatasetConfig`` (or the subclass ``config_class`` with its ``extra`` fields) for
    indexed GPT datasets (or ``--mock-data``) from ``args``."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config_class = config_class or GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    return config_class(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        split=args.split if blend is not None else None,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        object_storage_cache_path=args.object_storage_cache_path,
        sequences_per_dataset=sequences_per_dataset,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # The model's causal kernel builds its own mask: a dataloader mask would be unused.
        create_attention_mask=False,
        context_parallel_size=args.context_parallel_size,
        **extra,
    )


def build_datasets(args: argparse.Namespace, tokenizer, train_val_test_num_samples,
                   is_built_on_rank) -> tuple:
    """Train / valid / test datasets of a run, as the trainer builds them: Megatron's
    ``BlendedMegatronDatasetBuilder`` over GPT datasets, or best-fit packed rows with
    ``--packing bestfit`` (``--mock-data``: Megatron's mock documents). The dataset
    rehearsal (``parcae_megatron.rehearse``) calls this same function."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from parcae_megatron.data.bestfit import BestFitDatasetConfig, dataset_class

    config_class, extra = GPTDatasetConfig, {}
    if args.packing == "bestfit":  # BOS-aligned best-fit rows (docs/design.md §6.3)
        config_class, extra = BestFitDatasetConfig, {"packing_buffer": args.packing_buffer}
    config = gpt_dataset_config_from_args(args, tokenizer, config_class, **extra)
    dataset_type = dataset_class(args.packing, args.mock_data)
    builder = BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                           is_built_on_rank, config)
    return dataset_type, builder.build()
