"""Number formats beyond integer grids (spec/formats.md): element codecs, scale rules, blocks, formats.

FORMATS maps the names the recipes and the public API (fqtrun/formats.py) use to Format objects:

    fp8_e4m3, fp8_e5m2            FP8, one FP32 scale per tensor ("tensorwise")
    fp8_e4m3_row, fp8_e5m2_row    FP8, one FP32 scale per row along the reduction dimension
    fp8_e4m3_b128                 DeepSeek-V3 FP8 tiles: FP32 scale per 1x128 (128x128 with 2-D blocks)
    mxfp8_e4m3, mxfp8_e5m2,
    mxfp6_e3m2, mxfp6_e2m3, mxfp4 OCP MX: blocks of 32, E8M0 scales (floor rule; rceil by option)
    nvfp4                         blocks of 16 E2M1, E4M3 block scales and an FP32 tensor scale (16x16 2-D)
"""

from __future__ import annotations

from fqtrun.quant.formats.elements import E2M1, E2M3, E3M2, E4M3, E5M2, ELEMENTS, FloatElement
from fqtrun.quant.formats.format import SCALE_RULES, Format, Quantized

__all__ = ["ELEMENTS", "FORMATS", "SCALE_RULES", "FloatElement", "Format", "Quantized", "make_format"]

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("fp8_e4m3", E4M3),
    Format("fp8_e5m2", E5M2),
    Format("fp8_e4m3_row", E4M3, "row"),
    Format("fp8_e5m2_row", E5M2, "row"),
    Format("fp8_e4m3_b128", E4M3, "block", 128),
    Format("mxfp8_e4m3", E4M3, "block", 32, "e8m0"),
    Format("mxfp8_e5m2", E5M2, "block", 32, "e8m0"),
    Format("mxfp6_e3m2", E3M2, "block", 32, "e8m0"),
    Format("mxfp6_e2m3", E2M3, "block", 32, "e8m0"),
    Format("mxfp4", E2M1, "block", 32, "e8m0"),
    Format("nvfp4", E2M1, "block", 16, "e4m3"),
)}


def make_format(name: str, scale_rule: str | None = None, block_2d: bool = False, setting: str = "format") -> Format:
    """The Format of a registry name with its options; one-line ValueError naming `setting` otherwise."""
    if name not in FORMATS:
        raise ValueError(f"{setting}={name!r} is unknown: use one of {', '.join(FORMATS)}")
    try:
        return FORMATS[name].with_options(scale_rule, block_2d)
    except ValueError as e:
        raise ValueError(f"{setting}={name}: {e}") from None
