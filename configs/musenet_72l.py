r"""musenet_72l: MuseNet's published shape: 72 layers, 24 heads, full (dense) attention over 4096 tokens.

    musenet-train --config=configs/musenet_72l.py --workdir=runs/musenet_72l --data_dir=/path/to/tfds_data \
        --config.mesh.fsdp=-1 --config.mesh.tensor=8

OpenAI's MuseNet post gives 72 layers, 24 attention heads and full attention over a 4096-token context,
trained with the Sparse Transformer's recompute and kernels; it does not give the width. We take
head_dim 64, so D = 24 x 64 = 1536 and MLP 4 D = 6144. With the default musenet10 vocabulary (21773 ids,
padded to 21888, tied embeddings) and all MuseNet embeddings the model has 2,081,848,320 parameters
(checked with `jax.eval_shape` in tests/test_configs.py; 2.04 B of them in the 72 blocks). In fp32
that is ~25 GB of parameters and AdamW moments (33 GB with gradients) before activations: shard it
(FSDP, and tensor parallelism for the heads / MLP / vocabulary) over several accelerators. Full
remat ('nothing' saved) keeps one [B, 4096, 1536] residual per layer.

Expected: not run here (it needs a multi-accelerator host). ~6 x (2.04 B + 34 M output layer) ~ 12.4
GFLOP per trained token for the matmuls plus ~2.7 GFLOP for causal dense attention at 4096 tokens:
1e5 steps of 256 x 4096 tokens are ~1.6e21 FLOP, about a week on 8 H100s at 35 % MFU. For a sparse
pattern instead: `--config.model.attention_pattern=strided --config.model.attention_stride=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # data.seq_len and model.max_len: one value; musenet-train refuses overrides giving them different ones.
    seq_len = ml_collections.FieldReference(4096)

    config.model = ml_collections.ConfigDict(dict(
        d_model=1536, num_heads=24, head_dim=64, mlp_dim=6144, num_layers=72, vocab_multiple=128,
        tie_embeddings=True, token_embedding="table", use_bias=True,
        use_positional=True, use_timing=True, timing_buckets=1024, timing_bucket_units=50,
        use_chord=True, chord_size=64, use_part=True, part_size=128, use_countdown=True, countdown_size=128,
        dropout_rate=0.1, mixup_prob=0.1, mixup_alpha=0.4,
        dtype="bfloat16", param_dtype="float32", init_std=0.02,
        attention_pattern="dense", attention_stride=0, attention_summary=0,
        attention_combination="merged", dense_every=0, attention_impl="xla", pallas_lowering="auto",
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
        batch_size=256, microbatches=4, total_steps=100_000, learning_rate=1.5e-4, warmup_steps=5000,
        end_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
        log_every=50,
        peak_flops_per_device=0.0,  # MFU only; 0: data-sheet peak of the accelerator found (CPU: measured).
    ))
    # The n-gram baseline beside validation: fitted on at most this many train tokens; order 0 = the best of 1..5.
    config.eval = ml_collections.ConfigDict(dict(batch_size=64, every_steps=2000, max_batches=50,
                                                 ngram_max_train_tokens=2_000_000, ngram_order=0))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=3, async_save=True))
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return config
