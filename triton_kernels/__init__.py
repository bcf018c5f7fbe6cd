"""Triton kernels of safedecode (installed as ``safedecode.triton_kernels``).

Imported only by :mod:`safedecode.ops.triton`; importing this package needs ``triton``.
"""
