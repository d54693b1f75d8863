"""The `musenet_midi` TFDS dataset (builder in `musenet_midi_dataset_builder.py`).

Kept import-free so that conversion workers, which import `convert`, do not load TFDS; import
`data_pipeline.musenet_midi.musenet_midi_dataset_builder` to register the dataset with TFDS.
"""
