"""Test-wide settings.

Triton kernels run through Triton's interpreter on machines without a GPU. The
variable must be set before any kernel module is imported (triton.jit reads it
at decoration time); an explicit TRITON_INTERPRET=0 (the GPU suite) is kept.

`make test` runs the suite in one pytest-xdist worker per core: each worker
then computes with one thread, since two workers with two threads each on two
cores run slower than either alone.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
