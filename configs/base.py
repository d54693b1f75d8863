r"""base: a 24-layer strided Sparse Transformer, context 2048 tokens, every 4th layer dense; a few GPUs.

    musenet-train --config=configs/base.py --workdir=runs/base --data_dir=/path/to/tfds_data

Model: D=1024, 24 layers x 16 heads x 64, MLP 4096, context 2048, strided attention (l=64) with merged
heads and layers 3, 7, 11, ... dense (the scan runs over a period of 4 layers), all MuseNet embeddings,
bf16 compute with fp32 parameters, full remat ('nothing' saved), dropout 0.1, FSDP over all devices.
About 328 M parameters (22.4 M in the tied 21888 x 1024 token table of the default vocabulary).

Expected (not yet measured): ~6 x (302 M + 22 M output layer) ~ 1.95 GFLOP per trained token for the
matmuls (the dense layers add ~4 %); 300 k steps of 128 x 2048 tokens are ~1.5e20 FLOP, about 15 hours
on 8 H100s at 35 % MFU. Validation bits/token
should end well below the small config's on the same data.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # data.seq_len and model.max_len: one value; musenet-train refuses overrides giving them different ones.
    seq_len = ml_collections.FieldReference(2048)

    config.model = ml_collections.ConfigDict(dict(
        d_model=1024, num_heads=16, head_dim=64, mlp_dim=4096, num_layers=24, vocab_multiple=128,
        tie_embeddings=True, token_embedding="table", use_bias=True,
        use_positional=True, use_timing=True, timing_buckets=1024, timing_bucket_units=50,
        use_chord=True, chord_size=64, use_part=True, part_size=128, use_countdown=True, countdown_size=128,
        dropout_rate=0.1, mixup_prob=0.0, mixup_alpha=0.4,
        dtype="bfloat16", param_dtype="float32", init_std=0.02,
        attention_pattern="strided", attention_stride=64, attention_summary=0,
        attention_combination="merged", dense_every=4, attention_impl="xla", pallas_lowering="auto",
        scan_layers=True, remat_policy="nothing",
    ))
    config.model.max_len = seq_len

    config.data = ml_collections.ConfigDict(dict(
        name="default", train_split="train", eval_split="validation", window_sampling="tokens", worker_count=8,
        transpose=True, transpose_max=3, volume=True, volume_max_shift=2, stretch=True,
        stretch_min=0.95, stretch_max=1.05,
        infill_rate=0.5, accompany_rate=0.15,  # data_pipeline.infill: half fill a span, 15 % accompany
    ))
    config.data.seq_len = seq_len

    config.train = ml_collections.ConfigDict(dict(
        batch_size=128, microbatches=1, total_steps=300_000, learning_rate=3e-4, warmup_steps=5000,
        end_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
        log_every=100,
        peak_flops_per_device=0.0,  # MFU only; 0: data-sheet peak of the accelerator found (CPU: measured).
    ))
    # The n-gram baseline beside validation: fitted on at most this many train tokens; order 0 = the best of 1..5.
    config.eval = ml_collections.ConfigDict(dict(batch_size=128, every_steps=5000, max_batches=50,
                                                 ngram_max_train_tokens=2_000_000, ngram_order=0))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, max_to_keep=3, async_save=True))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return config
