"""fastdetr.kernels: the Triton kernels behind fastdetr's fused paths.

This directory sits at the top of the repository but is installed as
`fastdetr.kernels` (see setup.py); always import it by that name. Importing
this package imports nothing else: Triton is loaded by the kernel modules
themselves, so `import fastdetr` works on machines without Triton.
"""
