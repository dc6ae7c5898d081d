"""hiermt: hierarchical language-model piano transcription in JAX/Flax."""
import setuptools

setuptools.setup(
    name="hiermt",
    version="0.1.0",
    description="Piano transcription by hierarchical language modelling with pretrained roll-based encoders (JAX/Flax).",
    packages=setuptools.find_packages(include=["hiermt", "hiermt.*"]),
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.12",
        "flax>=0.12.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "numpy>=2.0",
        "scipy",
        "librosa>=1.0",
        "soundfile",
        "note-seq==0.0.5",
        "pretty_midi",
        "mir_eval>=0.8",
        "ml_collections>=1.1",
        "absl-py",
        "tensorboard>=2.21",
        "tensorboardX>=2.6",
        "tqdm",
        "matplotlib",
        "music21",
        "mido",
    ],
    extras_require={"test": ["pytest>=9", "pytest-xdist>=3.8"]},
)
