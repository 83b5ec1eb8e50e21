"""The result dict as tables: every figure and note a reader of `fqtrun bench` looks for."""

from __future__ import annotations

from rich.console import Console

from fqtrun.bench.tables import load_line, result_tables


def steps(model: str) -> dict:
    return {"model": model, "int8_layers_ran_int8": 2, "layers": 3, "steps": {
        "fp32": {"x_fp32": 1.0, "speedup_vs_fp32": 1.0, "median_ms": 10.0},
        "FQT int8": {"x_fp32": 0.5, "speedup_vs_fp32": 2.0, "median_ms": 5.0, "speedup_vs_bf16": 1.5},
        "torchao int8 mixed precision": {"status": "not installed"}}}


RESULT = {"load_before": [0.5, 0, 0], "load_after": [0.75, 0, 0], "cpu_capability": "AVX2", "int8_gemm": "fp32",
          "runs": [{
    "threads": 2, "load": [0.6, 0, 0],
    "quantizers": {"clone": {"x_clone": 1.0, "median_ms": 1.0},
                   "householder SR": {"x_clone": 8.0, "median_ms": 8.0, "x_psq": 1.25}},
    "formats": {"clone": {"x_clone": 1.0, "median_ms": 1.0}, "mxfp4 RTN": {"x_clone": 1.75, "median_ms": 1.75},
                "mxfp4 SR": {"x_clone": 2.5, "median_ms": 2.5}, "mxfp4 SR+RHT16": {"x_clone": 3.25, "median_ms": 3.25}},
    "linear": steps("mlp"), "cnn": steps("cnn1d"),
    "masks": {"size": 4096, "rows": {"clone() (floor)": {"median_ms": 16.0, "x_clone": 1.0, "target_ms": None},
                                     "transposable 2:4, exact": {"median_ms": 60.8, "x_clone": 3.8, "target_ms": 100.0},
                                     "transposable 4:8, greedy": {"median_ms": 1200.0, "x_clone": 75.0,
                                                                  "target_ms": 1000.0}}}}]}


def test_quantizer_format_step_and_mask_tables_per_thread_count():
    tables = result_tables(RESULT)
    assert [t.title for t in tables] == ["quantizers, 2 thread(s), load 0.6",
                                         "number formats, fake quantization vs clone(), 2 thread(s), load 0.6",
                                         "train step, mlp, 2 thread(s)", "train step, cnn1d, 2 thread(s)",
                                         "mask search, 4096 x 4096 fp32 weight, 2 thread(s)"]
    console = Console(record=True, width=200)
    for t in tables:
        console.print(t)
    text = console.export_text()
    for needle in ("1.25", "2.00x", "1.50x vs bf16; 2/3 layers all-int8", "not installed", "< 100 ms ✓", "< 1000 ms ✗",
                   "mxfp4", "1.75x", "3.25x", "1.8 / 2.5 / 3.2"):
        assert needle in text


def test_load_line():
    assert load_line(RESULT) == "load average before/after: 0.50 / 0.75; CPU AVX2, int8 GEMMs via fp32"
