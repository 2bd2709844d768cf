"""Triton kernels, installed as promptbake.kernels.

Import these modules only through promptbake.ops: Triton reads TRITON_INTERPRET when a kernel
is defined, so the dispatcher decides when the import happens.
"""
