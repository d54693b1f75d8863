r"""tiny: a 4-layer strided Sparse Transformer that trains on a CPU in minutes (smoke runs, CI, demos).

    musenet-train --config=configs/tiny.py --workdir=/tmp/tiny --data_dir=/path/to/tfds_data

Model: D=128, 4 layers x 4 heads x 32, MLP 512, context 256 tokens, strided attention (l=16) interleaved
local / summary over layers, all MuseNet embeddings on, fp32 (bf16 is slow on CPUs), no remat.
About 3.8 M parameters, 2.8 M of them the 21888 x 128 token table of the default musenet10
vocabulary (21773 ids, padded to a multiple of 128).

Expected: the training loss falls from ln(21773) ~ 14.4 bits/token at step 0 to ~9 bits/token by
step 100 (measured with this config's model, batch and schedule on random 256-token crops of the 13
MIDI files in tests/fixtures/midi: 14.4, 10.0 at step 50, 8.9 at step 100), then keeps falling; judge
a run against the unigram baseline the trainer prints. Speed: a step is ~45 GFLOP (forward + backward),
three quarters of it in the 21773-way output layer, so roughly 1 s on 2 idle CPU cores and the 600
steps in ~10 minutes (measured here: 5.6 s/step with the 2 cores shared by ~8 busy processes).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    seq_len = ml_collections.FieldReference(256)

    config.model = ml_collections.ConfigDict(dict(
        d_model=128, num_heads=4, head_dim=32, mlp_dim=512, num_layers=4, vocab_multiple=128,
        tie_embeddings=True, token_embedding="table", use_bias=True,
        use_positional=True, use_timing=True, timing_buckets=1024, timing_bucket_units=50,
        use_chord=True, chord_size=64, use_part=True, part_size=128, use_countdown=True, countdown_size=128,
        dropout_rate=0.0, mixup_prob=0.0, mixup_alpha=0.4,
        dtype="float32", param_dtype="float32", init_std=0.02,
        attention_pattern="strided", attention_stride=16, attention_summary=0,
        attention_combination="interleaved", dense_every=0, attention_impl="xla", pallas_lowering="auto",
        scan_layers=True, remat_policy="off",
    ))
    config.model.max_len = seq_len

    config.data = ml_collections.ConfigDict(dict(
        name="default", train_split="train", eval_split="validation", window_sampling="tokens", worker_count=0,
        transpose=True, transpose_max=3, volume=True, volume_max_shift=2, stretch=True,
        stretch_min=0.95, stretch_max=1.05,
    ))
    config.data.seq_len = seq_len

    config.train = ml_collections.ConfigDict(dict(
        batch_size=8, microbatches=1, total_steps=600, learning_rate=1e-3, warmup_steps=50,
        end_lr_fraction=0.1, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01, grad_clip=1.0,
        log_every=25, peak_flops_per_device=0.0,
    ))
    # The n-gram baseline beside validation: fitted on at most this many train tokens; order 0 = the best of 1..5.
    config.eval = ml_collections.ConfigDict(dict(batch_size=8, every_steps=300, max_batches=10,
                                                 ngram_max_train_tokens=2_000_000, ngram_order=0))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=300, max_to_keep=2, async_save=True))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config
