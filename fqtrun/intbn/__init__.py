"""Integer-exact fixed-point BatchNorm (spec/denoise_bn.md B): BN + requantization as
clip((A x + B) >> T, 0, L) on a layer's integer accumulator, bit-exact against the float reference.

derive: the exact (a, b), the smallest-shift (A, B, T) and its verification; requant: the integer and
the exact reference ops; blocks: the conv -> BN [-> ReLU] -> quantized layer blocks of a model (fx);
calibrate: static activation scales; convert: a calibrated model's blocks swapped for the ops.
"""
