from setuptools import setup

setup(
    name="minirl",
    version="0.1.0",
    description="Compact pure-PyTorch RL (GRPO family) and distillation for reasoning LLMs, "
    "with pass@k / accuracy-vs-capability analysis",
    # The Triton kernels stay in the top-level folder kernels/ (read beside minirl/), but are
    # installed as minirl.kernels: a top-level `kernels` would clash with Hugging Face's
    # `kernels` package (used by transformers). From a checkout, minirl/kernels/__init__.py
    # points minirl.kernels at the same folder; it is not installed.
    packages=["minirl", "minirl.kernels"],
    package_dir={"minirl.kernels": "kernels"},
    package_data={"minirl": ["behaviours.json"]},  # the judge's behaviour definitions
    python_requires=">=3.10",
    # Permissive on purpose: users bring their own (CUDA) torch. CI pins the CPU wheel.
    install_requires=[
        "torch>=2.4",
        "safetensors",
        "tokenizers>=0.19",
        "numpy",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # Everything the test suite needs, optional features included.
        "test": ["pytest", "pytest-timeout", "transformers>=4.45", "accelerate", "gguf",
                 "jinja2", "sympy", "math-verify", "pyarrow", "matplotlib", "datasets",
                 "setuptools>=70.1"],  # tests/test_install.py builds the wheel without isolation
        "plot": ["matplotlib"],
        "hub": ["huggingface_hub", "datasets"],  # hub ids; Hugging Face datasets as --data
        "math": ["math-verify", "sympy"],
    },
)
