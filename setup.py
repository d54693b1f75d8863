"""musenet-jax: train, evaluate, export and sample MuseNet-class music models in JAX."""

from setuptools import find_packages, setup

setup(
    name="musenet-jax",
    version="0.1.0",
    description="JAX-native MuseNet-class music models: MIDI tokens, sparse transformer, Pallas kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["data_pipeline*", "musenet_jax*", "pallas_kernels*", "launch*"]),
    include_package_data=True,
    package_data={"data_pipeline": ["corpus/**/*", "corpus/*"], "launch": ["recipes/*"],
                  "musenet_jax": ["csrc/*.cc", "static/*", "static/**/*"]},
    install_requires=[
        "numpy>=2.0,<3",
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<4.10",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8.6,<0.9",
        "miditoolkit>=1.0.1,<1.1",
        "symusic>=0.6.0,<0.7",
        "absl-py>=2.1,<3",
        "ml_collections>=1.1,<1.2",
        "tensorboardX>=2.6,<3",
        "safetensors>=0.4,<1",
        "matplotlib>=3.8,<4",
        "starlette>=1.10,<2",  # musenet-serve: the JSON API and the page
        "uvicorn>=0.55,<0.56",
    ],
    extras_require={
        # Workdirs and data on Google Cloud Storage (gs://...) for pod jobs: run files through
        # etils.epath/fsspec, TensorBoard events through tensorboardX's GCS writer.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14,<4"],
        "dev": [
            "pytest>=8.0,<10",
            "pytest-xdist>=3.8,<4",  # .ci/run: test files spread over the cores (3.8: --no-loadscope-reorder)
            "hypothesis>=6.100,<7",
            "ruff>=0.8,<1",
            "miditok>=3.0.4,<4",  # reference tokenizer for benchmarks/tokenize.py
            "mido>=1.3,<2",  # hand-made MIDI files in tests
            "filelock>=3.12,<4",  # tests/conftest.py: the run's shared JAX compilation cache is locked with it
            "selenium>=4.20,<5",  # tests/serve/test_browser.py drives Debian's chromium through its chromedriver
        ],
    },
    entry_points={
        "console_scripts": [
            "musenet-tokenize=launch.tokenize_midi:run",
            "musenet-detokenize=launch.detokenize_midi:run",
            "musenet-build-data=launch.build_data:run",
            "musenet-train=launch.train:run",
            "musenet-launch=launch.launch_local:run",
            "musenet-export=launch.export:run",
            "musenet-pod=launch.pod:run",
            "musenet-eval=launch.evaluate:run",
            "musenet-generate=launch.generate:run",
            "musenet-stats=launch.stats:run",
            "musenet-serve=launch.serve:run",
        ],
    },
)
