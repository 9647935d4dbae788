"""Packaging for fastdetr.

`kernels/` sits at the top of the repository (it is the project's Triton
kernel tree) but installs as `fastdetr.kernels`: a PyPI package called
`kernels` exists and a top-level module of that name would shadow it.
"""
from setuptools import setup

setup(
    name="fastdetr",
    version="0.1.0",
    description="DETR with fused Triton kernels and a batched GPU Hungarian matcher",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastdetr", "fastdetr.reference", "fastdetr.data", "fastdetr.nn", "fastdetr.measure", "fastdetr.kernels"],
    package_dir={"fastdetr.kernels": "kernels"},
    install_requires=[
        # A range, not a pin: the CPU wheel here is 2.13.0, the GPU machines run 2.11.
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "scipy",
        "pillow",
        "pycocotools",
        "tqdm",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "pytest-xdist",
            "onnx",
            "onnxruntime",
            "matplotlib",
            "ruff",
            "transformers",  # tests/test_convert_deformable.py builds its Deformable DETR and RT-DETR models
            "accelerate",    # transformers.Trainer, in tests/test_hf_detr_optimize.py
        ],
    },
    entry_points={"console_scripts": ["fastdetr=fastdetr.cli:main"]},
)
