"""Portable numerics (fqtrun/numerics_mode.py): the same bits whatever kernels this CPU would pick.

The CPUs a portable run must agree across are simulated on this one: ATEN_CPU_CAPABILITY preset to each
capability the CPU offers (torch's kernels for an AVX2 or an AVX-512 machine) and MKL_ENABLE_INSTRUCTIONS
AVX2 / AVX512, each in its own `fqtrun train` process. Oracle: the weights (last.pt) and metrics of every
portable process are equal bit for bit, and equal to the digest committed in tests/golden (made on an AMD
EPYC with AVX-512), on whatever machine runs this; the same processes in native mode differ, so the
comparison can fail. What one CPU cannot pretend (MKL's branch on another vendor, NNPACK's blocking for
another L1 size) only the golden digest, checked on other machines, catches.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fqtrun import numerics_mode
from fqtrun.errors import ConfigError
from fqtrun.numerics_mode import ENV, PORTABLE_BY_DEFAULT, machine_info, numerics, wanted
from fqtrun.quant.gradient import BlockHouseholder, PerColumn, PerSample, quantize_pair
from fqtrun.quant.native import library
from fqtrun.report.machines import machine_block

GOLDEN = Path(__file__).parent / "golden" / "portable_cnn1d.json"
RUN = json.loads(GOLDEN.read_text())["overrides"]  # a tiny quantized MNIST-1D CNN run, loss logged every step
SET_HERE = {*ENV, "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"}  # what each process's environment decides
CLEAN = {k: v for k, v in os.environ.items() if k not in SET_HERE}


def capabilities() -> list[str]:
    """The ATen capabilities this CPU can run (x86-64: default, avx2 with FMA, avx512 with F/BW/VL/DQ)."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    caps = ["default"]
    if {"avx2", "fma"} <= flags:
        caps.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        caps.append("avx512")
    return caps


# a native machine of each kind, as far as this CPU can pretend: ATen's kernels, oneDNN's ISA and MKL's
SIMULATED = {"default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
             "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                      "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "avx512": {"ATEN_CPU_CAPABILITY": "avx512"}}


def digest(folder: Path) -> dict:
    """sha256 of the saved model's tensors (name, dtype, shape, bytes, in name order) and of the metrics
    (every metrics.jsonl record without its timings)."""
    state = torch.load(folder / "last.pt", weights_only=False)["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    metrics = json.dumps([{k: v for k, v in r.items() if "time" not in k} for r in records], sort_keys=True)
    return {"weights": h.hexdigest(), "metrics": hashlib.sha256(metrics.encode()).hexdigest()}


def train(folder: Path, env: dict[str, str], *overrides: str) -> dict:
    """`fqtrun train <RUN> <overrides>` in a fresh process with env on top of a clean environment."""
    command = [sys.executable, "-m", "fqtrun", "train", *RUN, *overrides, f"hydra.run.dir={folder}"]
    out = subprocess.run(command, env={**CLEAN, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return {**digest(folder), "machine": json.loads((folder / "summary.json").read_text())["machine"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every simulated CPU in portable and in native mode: label -> digest (two processes at a time)."""
    root, cache = tmp_path_factory.mktemp("portable"), tmp_path_factory.mktemp("cache")
    stale = {"AVX2": {"MKL_CBWR": "AUTO"}, "AVX512": {}}  # a pin the user set otherwise is overridden too
    jobs = {f"portable {cap} mkl {isa}": (
        {"ATEN_CPU_CAPABILITY": cap, "MKL_ENABLE_INSTRUCTIONS": isa, **stale[isa]}, "numerics.portable=true")
        for cap in capabilities() for isa in ("AVX2", "AVX512")}
    jobs |= {f"native {cap}": (SIMULATED[cap], "threads=1") for cap in capabilities()[-2:]}  # the two widest
    with ThreadPoolExecutor(2) as pool:
        futures = {label: pool.submit(train, root / str(i), env, f"dataset.cache_dir={cache}", extra)
                   for i, (label, (env, extra)) in enumerate(jobs.items())}
        futures["reproduce job"] = pool.submit(reproduce_job, root / "reproduce", cache)
        return {label: f.result() for label, f in futures.items()}


REPRODUCE = """
import sys
from omegaconf import OmegaConf
from fqtrun.experiment.spec import ReproduceConfig
from fqtrun.runs.reproduce import run_reproduction
if __name__ == "__main__":
    exp = {"name": "tiny", "seeds": [0], "common": sys.argv[2:], "variants": {"run": {}}}
    cfg = OmegaConf.merge(OmegaConf.structured(ReproduceConfig),
                          {"experiment": exp, "jobs": 2, "out": sys.argv[1]})
    run_reproduction(cfg, log=print)
"""


def reproduce_job(out: Path, cache: Path) -> dict:
    """The same run as one training of a portable (default) reproduce grid, in a spawned job process of a
    process started as the CLI starts it (the pins in its environment)."""
    script = out.parent / "reproduce_tiny.py"
    script.write_text(REPRODUCE)
    done = subprocess.run([sys.executable, str(script), str(out), *RUN, f"dataset.cache_dir={cache}"],
                          env={**CLEAN, **ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = out / "runs" / "run" / "seed0"
    return {**digest(folder), "machine": json.loads((folder / "summary.json").read_text())["machine"]}


def test_portable_runs_are_equal_to_the_last_bit_whatever_the_kernels(runs):
    portable = {label: r for label, r in runs.items() if label.startswith("portable")}
    assert len(portable) >= 2
    first = next(iter(portable.values()))
    for label, r in portable.items():
        assert (r["weights"], r["metrics"]) == (first["weights"], first["metrics"]), label
        m = r["machine"]
        assert m["portable"] and m["aten_capability"] == "DEFAULT" and m["threads"] == 1, label
        assert m["mkl_branch"] in ("COMPATIBLE", None) and m["kernels"] != "native", label


def test_a_reproduce_job_process_runs_portable_too(runs):
    job, cli = runs["reproduce job"], next(r for label, r in runs.items() if label.startswith("portable"))
    assert job["machine"]["portable"] and job["machine"]["aten_capability"] == "DEFAULT"
    assert (job["weights"], job["metrics"]) == (cli["weights"], cli["metrics"])


def test_native_runs_differ_so_the_comparison_can_fail(runs):
    native = [r for label, r in runs.items() if label.startswith("native")]
    if len(native) < 2:
        pytest.skip("this CPU offers one ATen capability only: no two native kernel sets to compare")
    if native[0]["weights"] == native[1]["weights"]:
        pytest.skip("the native AVX2 and AVX-512 kernels happen to agree on this tiny run here")
    assert native[0]["machine"]["aten_capability"] != native[1]["machine"]["aten_capability"]
    assert not native[0]["machine"]["portable"]


def test_portable_run_matches_the_committed_golden_digest(runs):
    golden = json.loads(GOLDEN.read_text())
    if torch.__version__.split("+")[0] != golden["torch"]:
        pytest.skip(f"the golden digest is for torch {golden['torch']}, this is {torch.__version__}")
    run = runs[next(label for label in runs if label.startswith("portable"))]
    here, there = run["machine"]["cpu"], golden["machine"]["cpu"]
    assert {"weights": run["weights"], "metrics": run["metrics"]} == golden["digest"], f"{here} vs {there}"


# ----- the pieces, in this process ----------------------------------------------------------------------
@pytest.mark.parametrize("command,args,expected", [
    ("train", [], False),
    ("reproduce", ["fqt"], True),
    ("train", ["numerics.portable=true"], True),
    ("train", ["numerics.portable=True", "numerics.portable=false"], False),  # the last one wins, as in Hydra
    ("reproduce", ["numerics.portable=false"], False),
    ("reproduce", ["numerics.portable=false", "~numerics.portable"], True),  # deleted: the schema's default
    ("train", ["-m", "numerics.portable=false,true"], True),  # a sweep with a portable job pins the process
    ("train", ["numerics.every=10"], False),
])
def test_the_cli_reads_portable_from_the_command_line(command, args, expected):
    assert wanted(command, args) is expected


def test_each_command_schema_has_the_setting_with_the_cli_default():
    import importlib

    from fqtrun.config import compose_conf

    for command in ("train", "prt", "variance", "mask", "intbn", "sample", "bench", "reproduce"):
        importlib.import_module(f"fqtrun.commands.{command}")  # registers its schema
        cfg = compose_conf(command, ["experiment=fqt"] if command == "reproduce" else [])
        assert cfg.numerics.portable is (command in PORTABLE_BY_DEFAULT), command


def test_pin_environment_sets_every_pin_once():
    env = {"ATEN_CPU_CAPABILITY": "avx512", "PATH": "/bin"}
    assert numerics_mode.pin_environment(env) and env == {**ENV, "PATH": "/bin"}
    assert not numerics_mode.pin_environment(env)


@pytest.mark.skipif(numerics_mode.unpinned() is None, reason="this test process was started portable")
def test_a_portable_run_in_a_native_process_refuses_in_one_line():
    with pytest.raises(ConfigError, match=r"^numerics.portable=true but .*ATEN_CPU_CAPABILITY=default") as e:
        with numerics(True):
            pass
    assert "\n" not in str(e.value)
    with numerics(False):  # native: nothing to check
        pass


def test_machine_block_lists_each_machine_once_with_its_runs():
    amd = {"machine": {**machine_info(True), "cpu": "AMD EPYC"}}
    intel = {"machine": {**machine_info(True), "cpu": "Intel Xeon", "cpu_flags": ["avx2", "fma"]}}
    text = machine_block([amd, intel, amd, {"final_test_acc": 0.9}])
    lines = text.splitlines()
    assert lines[0] == "Machines (4 runs):" and lines[2].startswith("| CPU | flags | ATen |")
    rows = lines[4:]
    assert len(rows) == 3 and rows[0].startswith("| AMD EPYC |") and rows[0].endswith("| portable | 2 |")
    assert rows[1].startswith("| Intel Xeon | avx2 fma |") and rows[2].startswith("| not recorded |")
    assert machine_block([]) == "" and machine_block([{"final_test_acc": 0.9}]) == ""


def test_portable_kernels_are_their_own_build_and_round_as_the_native_one(monkeypatch):
    """The C kernels built for x86-64-v3 (portable) under another cache key give the native build's bits."""
    if library.load() is None:
        pytest.skip("no C compiler: the torch forms run in both modes")
    x = torch.randn(64, 2100, generator=torch.Generator().manual_seed(0)) * 3
    outs, keys = {}, {}
    try:
        for mode in ("0", "1"):
            monkeypatch.setenv(library.PORTABLE_ENV, mode)
            library.load.cache_clear()
            keys[mode] = library.flags()
            pair = quantize_pair(PerSample(4), PerColumn(8), x, 1, 2)
            outs[mode] = [*(c.codes for c in pair), BlockHouseholder(4)(x, 3), library.load()._name]
    finally:
        library.load.cache_clear()
    assert library.PORTABLE_ENV == numerics_mode.PORTABLE_ENV and ENV[library.PORTABLE_ENV] == "1"
    assert "-march=native" in keys["0"] and "-march=native" not in keys["1"]
    assert outs["0"][-1] != outs["1"][-1]  # two libraries
    assert all(torch.equal(a, b) for a, b in zip(outs["0"][:-1], outs["1"][:-1]))


def test_a_native_finished_run_is_not_reused_as_a_portable_one(tmp_path):
    from fqtrun.errors import FqtrunError
    from fqtrun.runs.train import finished_summary

    (tmp_path / "summary.json").write_text(json.dumps({"overrides": ["epochs=1", "seed=0"]}))
    assert finished_summary(tmp_path, ["seed=0", "epochs=1"])["overrides"] == ["epochs=1", "seed=0"]
    with pytest.raises(FqtrunError, match="with native numerics: pass numerics.portable=false to reuse it"):
        finished_summary(tmp_path, ["epochs=1", "numerics.portable=true", "seed=0"])


def test_a_portable_run_on_the_gpu_is_refused():
    with pytest.raises(ConfigError, match="device=cuda would run on the GPU: pass device=cpu"):
        numerics_mode.check_cpu("cuda")
    numerics_mode.check_cpu("cpu")
