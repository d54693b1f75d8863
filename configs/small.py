r"""small: a 12-layer strided Sparse Transformer for one GPU (or a few), context 1024 tokens.

    musenet-train --config=configs/small.py --workdir=runs/small --data_dir=/path/to/tfds_data

Model: D=512, 12 layers x 8 heads x 64, MLP 2048, context 1024, strided attention (l=32) with both
parts merged in every head, all MuseNet embeddings on, bf16 compute with fp32 parameters, remat saving
the weight matmuls ('dots'), dropout 0.1. About 50.2 M parameters (11.2 M in the tied 21888 x 512
token table of the default vocabulary).

Expected (not yet measured on a GPU): a GPT-2-small-class run; about 6 x (38 M + 11 M output layer)
~ 0.29 GFLOP per trained token for the matmuls, so 100 k steps of 64 x 1024 tokens are ~1.9e18 FLOP:
a few hours on one H100 (2 h at 25 % MFU). Validation bits/token should end well under the unigram
baseline that the trainer prints at start; compare runs by that number, not across datasets.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # data.seq_len and model.max_len: one value; musenet-train refuses overrides giving them different ones.
    seq_len = ml_collections.FieldReference(1024)

    config.model = ml_collections.ConfigDict(dict(
        d_model=512, num_heads=8, head_dim=64, mlp_dim=2048, num_layers=12, vocab_multiple=128,
        tie_embeddings=True, token_embedding="table", use_bias=True,
        use_positional=True, use_timing=True, timing_buckets=1024, timing_bucket_units=50,
        use_chord=True, chord_size=64, use_part=True, part_size=128, use_countdown=True, countdown_size=128,
        dropout_rate=0.1, mixup_prob=0.0, mixup_alpha=0.4,
        dtype="bfloat16", param_dtype="float32", init_std=0.02,
        attention_pattern="strided", attention_stride=32, attention_summary=0,
        attention_combination="merged", dense_every=0, attention_impl="xla", pallas_lowering="auto",
        scan_layers=True, remat_policy="dots",
    ))
    config.model.max_len = seq_len

    config.data = ml_collections.ConfigDict(dict(
        name="default", train_split="train", eval_split="validation", window_sampling="tokens", worker_count=4,
        transpose=True, transpose_max=3, volume=True, volume_max_shift=2, stretch=True,
        stretch_min=0.95, stretch_max=1.05,
        infill_rate=0.5, accompany_rate=0.15,  # data_pipeline.infill: half fill a span, 15 % accompany
    ))
    config.data.seq_len = seq_len

    config.train = ml_collections.ConfigDict(dict(
        batch_size=64, microbatches=1, total_steps=100_000, learning_rate=6e-4, warmup_steps=2000,
        end_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
        log_every=100,
        peak_flops_per_device=0.0,  # MFU only; 0: data-sheet peak of the accelerator found (CPU: measured).
    ))
    # The n-gram baseline beside validation: fitted on at most this many train tokens; order 0 = the best of 1..5.
    config.eval = ml_collections.ConfigDict(dict(batch_size=64, every_steps=2000, max_batches=50,
                                                 ngram_max_train_tokens=2_000_000, ngram_order=0))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=2000, max_to_keep=3, async_save=True))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config
