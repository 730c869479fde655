"""Kernel sources shipped inside relprop; ``relprop._kernels.triton`` is kernels/triton/."""
