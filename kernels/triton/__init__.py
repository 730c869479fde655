"""Fused Triton LRP kernels, one op per module (``linear``, ``conv``).

They know tensors, shapes and numbers only; the engine in ``relprop.ops`` calls their launchers.
"""
