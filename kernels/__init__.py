"""GPU kernels of relprop; ``kernels/triton`` ships as ``relprop._kernels.triton``."""
