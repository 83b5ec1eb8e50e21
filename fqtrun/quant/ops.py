"""fqtrun's torch custom ops (torch.library, namespace `fqtrun`): the quantizers and format casts as ops.

Why: torch.compile (and torch.export) see an op with a fake implementation (output shape and dtype only)
instead of Python that calls C through ctypes, so a quantized model's training step compiles without
graph breaks, and a kernel for another device can be registered on the op later without touching the
layers. This module declares the ops (schema, fake implementation, autograd); the module of each
quantizer registers its own eager code as the implementation (`implement`: C kernels on CPU float32, the
torch forms elsewhere), so compiled and eager give the same codes bit for bit (tests/quant/test_ops.py).

    fqtrun::mix_seed(counter, parts)         mix_seed(*counter, *parts) as a 0-d int64 tensor
    fqtrun::minmax_fake(x, bits, granularity)   MinMaxQuantizer's min-max grid, round to nearest
    fqtrun::sr_fake(x, quantizer, bits, grid, compile, seed)   PTQ / PSQ / BHQ / per-column SR
    fqtrun::format_fake(x, format, rule, two_d, rounding, dim, seed, rht_block, rht_signs, key)
    fqtrun::rht(x, dim, block, signs, key, inverse)   the random Hadamard transform

Seeds and transform keys are 0-d int64 tensors: under torch.compile the step's seed is then an input of
the graph, not a constant it recompiles for. Eager code calls the quantizers directly (an op's dispatch
costs 5-10 us per call, which a small layer's step notices); the quantizers call these ops while torch is
tracing (`tracing()`). The quantizing ops are straight-through under autograd (the gradient passes
unchanged), as the quantizers' own __call__ is; the simulate backend calls them inside its backward.
"""

from __future__ import annotations

import torch

from fqtrun.quant.grid import mix_seed as mix_seed_int

Tensor = torch.Tensor

_LIB = torch.library.Library("fqtrun", "DEF")  # torch's op registry is process-wide; this module owns the namespace


def tracing() -> bool:
    """True while torch.compile / torch.export trace the code (then the quantizers call the ops)."""
    return torch.compiler.is_compiling()


def _define(name: str, schema: str, fake, straight_through: bool = True):
    """Declare fqtrun::<name> with its fake implementation and, for the quantizing ops, a straight-through
    autograd rule; returns the op (its implementation comes from `implement`)."""
    _LIB.define(f"{name}{schema}")
    torch.library.register_fake(f"fqtrun::{name}", fake, lib=_LIB)
    op = getattr(torch.ops.fqtrun, name).default
    if straight_through:
        n_inputs = len(op._schema.arguments)

        def backward(ctx, grad):
            if tuple(grad.shape) != ctx.shape:
                raise RuntimeError(f"fqtrun::{name}: a transformed (padded) output has no straight-through "
                                   "gradient: differentiate the transform itself")
            return (grad, *([None] * (n_inputs - 1)))

        def setup_context(ctx, inputs, output):
            ctx.shape = tuple(inputs[0].shape)

        torch.library.register_autograd(f"fqtrun::{name}", backward, setup_context=setup_context, lib=_LIB)
    return op


def implement(op, fn) -> None:
    """Register fn as op's implementation for every device (the quantizer modules call this at import)."""
    _LIB.impl(op._schema.name.split("::")[1], fn, "CompositeExplicitAutograd")


def as_seed(seed: int | Tensor) -> Tensor:
    """A seed or key as the ops take it: a 0-d int64 tensor (a tensor passes through)."""
    return seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int64)


def seed_value(seed: int | Tensor) -> int:
    """The int a seed tensor holds (an int passes through)."""
    return int(seed.item()) if isinstance(seed, Tensor) else seed


# ----- seeds -------------------------------------------------------------------------------------------
def _mix_seed_impl(counter: Tensor, parts: list[int]) -> Tensor:
    return torch.tensor(mix_seed_int(*counter.tolist(), *parts), dtype=torch.int64)


mix_seed = _define("mix_seed", "(Tensor counter, int[] parts) -> Tensor",
                   lambda counter, parts: counter.new_empty((), dtype=torch.int64), straight_through=False)
implement(mix_seed, _mix_seed_impl)


def mix(seed: int | Tensor, *parts: int) -> int | Tensor:
    """grid.mix_seed(seed, *parts) of an int seed, or of a seed tensor (the op)."""
    if isinstance(seed, Tensor):
        return mix_seed(seed.reshape(1), list(parts))
    return mix_seed_int(seed, *parts)


# ----- quantizers (implemented by quantizers.py, gradient.py, formats/quantizer.py, transforms.py) -----------
minmax_fake = _define("minmax_fake", "(Tensor x, int bits, str granularity) -> Tensor",
                      lambda x, bits, granularity: torch.empty_like(x))
sr_fake = _define("sr_fake", "(Tensor x, str quantizer, int bits, str grid, bool compile, Tensor seed) -> Tensor",
                  lambda x, quantizer, bits, grid, compile, seed: torch.empty_like(x))


def _padded_like(x: Tensor, dim: int, block: int) -> Tensor:
    """An empty tensor shaped as x with dim padded to a multiple of block (block 0: x's shape)."""
    shape = list(x.shape)
    if block and x.dim():
        shape[dim] = -(-shape[dim] // block) * block
    return x.new_empty(shape)


format_fake = _define(
    "format_fake",
    "(Tensor x, str format, str rule, bool two_d, str rounding, int dim, Tensor seed, int rht_block, "
    "str rht_signs, Tensor key) -> Tensor",
    lambda x, format, rule, two_d, rounding, dim, seed, rht_block, rht_signs, key: _padded_like(x, dim, rht_block))
rht = _define("rht", "(Tensor x, int dim, int block, str signs, Tensor key, bool inverse) -> Tensor",
              lambda x, dim, block, signs, key, inverse: _padded_like(x, dim, 0 if inverse else block),
              straight_through=False)
