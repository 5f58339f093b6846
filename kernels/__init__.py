"""Triton kernels and their launchers (installed as ``fusedloss.kernels``), one module per loss.

Importing this package imports nothing: the submodules import triton, and are imported only when
the ``triton`` backend is used. Under ``TRITON_INTERPRET=1`` (set before a submodule is imported)
the kernels run on CPU tensors through triton's interpreter; that is how the tests run them.
"""
