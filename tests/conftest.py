"""Test-wide settings.

Triton kernels run through Triton's interpreter on machines without a GPU. The
variable must be set before any kernel module is imported (triton.jit reads it
at decoration time); an explicit TRITON_INTERPRET=0 (the GPU suite) is kept.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
