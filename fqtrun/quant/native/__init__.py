"""C kernels of the quantizers (kernels.c), built with the machine's compiler on first use.

library   build, cache and load; what the wrappers share (plain-tensor check, ctypes structs)
sr        range pass and stochastic-rounding pass of a gradient matrix (one or two grids at once)
bhq       BHQ's set-up, reflections, transformed-row ranges and fused SR with T^-1
int8      the int8 backend's forward codes with their row/column sums, and its GEMM epilogue

Every wrapper returns None when the kernels cannot run (no compiler, tensors they do not take);
the caller then runs the torch form, which the kernels equal bit for bit on CPUs with FMA
(tests/quant/test_native.py).
"""
