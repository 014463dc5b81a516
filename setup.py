"""The package mapping of vispec-vllm (metadata: pyproject.toml).

`patches/` lives at the top of the checkout (every change to vLLM's own behaviour, kept visible) but
is imported as `vispec_vllm.patches`; every other subpackage of `vispec_vllm/` ships as it is, with
the demo pairs' model files.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["vispec_vllm", "vispec_vllm.*"]), "vispec_vllm.patches"],
    package_dir={"vispec_vllm": "vispec_vllm", "vispec_vllm.patches": "patches"},
    # One folder per shipped model; float32 build folders (demo/models/fp32/) stay out.
    package_data={"vispec_vllm.demo.models": ["*/*.json", "*/*.jinja", "*/*.safetensors"]},
    exclude_package_data={"vispec_vllm.demo.models": ["fp32/*"]},
)
