"""Triton paths of the kernels, for CUDA tensors (install ``privfed[gpu]``).

Nothing in ``kernels`` imports this package at import time: the public functions import
:mod:`kernels._triton.launch` only when handed a CUDA tensor or device, so CPU-only sites and
servers never need Triton. Tests run the same kernels on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` set before the first import of this package).
"""
