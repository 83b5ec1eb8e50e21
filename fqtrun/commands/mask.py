"""fqtrun mask: what an N:M / transposable N:M mask costs a trained model, and dense -> N:M conversion.

    fqtrun mask checkpoint=outputs/<run>/last.pt sparsity.kind=transposable sparsity.n=4 sparsity.m=8
    fqtrun mask checkpoint=outputs/<run>/last.pt sparsity.n=2 sparsity.m=4 convert.calibration_batches=8

Spec sparsity.md. Convention: N is the number KEPT in every group of M (2:4 keeps 2 of 4).
1. Per masked layer: kept |w| of the structured mask over unstructured top-k at the same density,
   greedy over exact (transposable), mask diversity of the constraint and of unstructured (log10),
   mask search times (fqtrun.sparsity.report.mask_report).
2. Conversion (convert.enabled, default when convert.calibration_batches > 0): magnitude masks, then
   per-layer least-squares reconstruction of the kept weights on the calibration batches and BN
   re-estimation (fqtrun.sparsity.reconstruct); test accuracy dense vs magnitude-only vs
   reconstructed; the sparse model is written to <out>/sparse/last.pt with a .hydra/config.yaml
   (the run's config plus the sparsity recipe), so every checkpoint-reading command loads it.
Layers masked: the same rule as sparse training (SparsityHook): every sparse-capable conv/linear but
the classifier (sparsity.keep_last) and sparsity.exclude. Writes mask.json and mask.md.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from rich import box
from rich.table import Table
from torch import nn

from fqtrun.build import checkpoint_path, load_train_run, pick_device
from fqtrun.commands.common import run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.data.loader import make_loader
from fqtrun.errors import ConfigError
from fqtrun.files import write_json
from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.layers import NoiseContext
from fqtrun.report.markdown import markdown_table
from fqtrun.sparsity.config import SCHEMAS as SPARSITY_SCHEMAS
from fqtrun.sparsity.diversity import count_transposable_blocks
from fqtrun.sparsity.reconstruct import BN_TYPES, reconstruct, reestimate_bn
from fqtrun.sparsity.report import mask_report
from fqtrun.sparsity.training import SparsityHook
from fqtrun.training.checkpoint import model_signature, save_checkpoint
from fqtrun.training.loggers import make_console, summary_table


@dataclass
class MaskSparsity:
    kind: str = "nm"  # nm (row-wise) | transposable (every m x m block: n per row and per column)
    n: int = 2  # kept in every group of m
    m: int = 4
    method: str = "exact"  # transposable search: exact | greedy
    keep_last: bool = True  # keep the classifier dense
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of layer names kept dense


@dataclass
class ConvertSettings:
    enabled: Optional[bool] = None  # null: true when calibration_batches > 0
    calibration_batches: int = 8  # training batches for the reconstruction and BN re-estimation
    batch_size: int = 100
    damping: float = 0.01  # ridge of the per-row least squares, relative to the mean input energy
    bn: bool = True  # re-estimate BatchNorm statistics after the reconstruction


@dataclass
class MaskCommandConfig:
    checkpoint: str = MISSING  # last.pt of a `fqtrun train` run folder (its .hydra/config.yaml is read)
    sparsity: MaskSparsity = field(default_factory=MaskSparsity)
    convert: ConvertSettings = field(default_factory=ConvertSettings)
    eval_batch_size: int = 1000
    seed: int = 0  # order of the calibration batches
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0 = torch's default)


register_configs()
ConfigStore.instance().store(name="mask_schema", node=MaskCommandConfig)


def log10_diversity(kind: str, t: int, n: int, m: int) -> float:
    """log10 of the number of masks of t weights at density n/m (spec "Mask diversity"), float-safe.

    unstructured C(t, t n/m); nm C(m, n)^(t/m); transposable (valid m x m blocks)^(t/m^2).
    """
    if kind == "unstructured":
        k = round(t * n / m)
        return (math.lgamma(t + 1) - math.lgamma(k + 1) - math.lgamma(t - k + 1)) / math.log(10)
    if kind == "nm":
        return t / m * math.log10(math.comb(m, n))
    if kind == "transposable":
        return t / (m * m) * math.log10(count_transposable_blocks(n, m))
    raise ValueError(f"kind={kind!r} must be unstructured, nm or transposable")


def _settings(cfg: DictConfig) -> tuple[SparsityHook, bool]:
    """The mask recipe (validated by SparsityHook) and whether to convert; raises one-line errors."""
    s, c = cfg.sparsity, cfg.convert
    hook = SparsityHook(kind=s.kind, n=s.n, m=s.m, method=s.method, exclude=list(s.exclude),
                        keep_last=s.keep_last)
    checks = [(c.calibration_batches >= 0, f"convert.calibration_batches={c.calibration_batches} must be >= 0"),
              (c.batch_size >= 1, f"convert.batch_size={c.batch_size} must be >= 1"),
              (c.damping > 0, f"convert.damping={c.damping} must be > 0: it keeps the least squares invertible"),
              (cfg.eval_batch_size >= 1, f"eval_batch_size={cfg.eval_batch_size} must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    enabled = c.calibration_batches > 0 if c.enabled is None else bool(c.enabled)
    if enabled and c.calibration_batches < 1:
        raise ConfigError("convert.enabled=true needs convert.calibration_batches >= 1 (the reconstruction and "
                          "BN re-estimation data); or pass convert.enabled=false for the mask report alone")
    return hook, enabled


@torch.no_grad()
def accuracy(model: nn.Module, dataset, batch_size: int, device: torch.device) -> float:
    """Test accuracy of the model in eval mode."""
    model.eval()
    correct = total = 0
    for x, y in make_loader(dataset, batch_size, shuffle=False, seed=0):
        correct += int((model(x.to(device)).argmax(-1) == y.to(device)).sum())
        total += len(y)
    return correct / max(total, 1)


def calibration_batches(dataset, count: int, batch_size: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """The first `count` batches of a seeded shuffle of the training split (inputs only)."""
    out = []
    for x, _ in make_loader(dataset, batch_size, shuffle=True, seed=seed):
        if len(out) == count:
            break
        out.append(x.to(device))
    return out


def _fold_masks(model: nn.Module) -> int:
    """A sparse run's model: multiply its masks into the weights, so the "dense" model is the one loaded."""
    folded = 0
    for _, layer in quant_layers(model):
        if layer.weight_mask is not None:
            layer.weight.data.mul_(layer.weight_mask)
            layer.weight_mask = None
            folded += 1
    return folded


def _kept_dense(model: nn.Module, masked: list[str], hook: SparsityHook) -> dict[str, str]:
    """Every conv/linear left dense, with the reason."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    out = {}
    for name in layers:
        if name in masked:
            continue
        if hook.keep_last and name == layers[-1]:
            out[name] = "classifier (sparsity.keep_last)"
        elif not hasattr(model.get_submodule(name), "weight_mask"):
            out[name] = "not sparse-capable: the run's quant settings kept it a plain layer"
        else:
            out[name] = "matches sparsity.exclude"
    return out


def _layer_rows(model: nn.Module, hook: SparsityHook) -> list[dict]:
    """mask_report rows of the masked layers, with the diversity of the constraint and of unstructured.

    The constraint's diversity is given where the layer tiles exactly (input channels a multiple of M,
    and output channels too for transposable); padded edge groups keep more and follow no formula.
    """
    rows = [r for r in mask_report(model, hook.n, hook.m, hook.kind) if r["layer"] in hook.names]
    for r in rows:
        out, cin = r["shape"][:2]
        t = math.prod(r["shape"])
        tiles = cin % hook.m == 0 and (hook.kind == "nm" or out % hook.m == 0)
        r["log10_md"] = log10_diversity(hook.kind, t, hook.n, hook.m) if tiles else None
        r["log10_md_unstructured"] = log10_diversity("unstructured", t, hook.n, hook.m)
    return rows


def _save_sparse(out: Path, run_cfg: DictConfig, model: nn.Module, name: str, source: Path,
                 hook: SparsityHook) -> Path:
    """<out>/last.pt (model weights, masks as weight_mask buffers) and <out>/.hydra/config.yaml."""
    cfg = run_cfg.copy()
    old = OmegaConf.to_container(cfg.sparsity) if cfg.get("sparsity") is not None else {}
    schema = SPARSITY_SCHEMAS[hook.kind]
    new = {"kind": hook.kind, "n": hook.n, "m": hook.m, "keep_last": hook.keep_last, "exclude": list(hook.exclude)}
    if hook.kind == "transposable":
        new["method"] = hook.method
    recipe = schema(**{k: v for k, v in {**old, **new}.items() if k in schema.__dataclass_fields__})
    cfg.sparsity = OmegaConf.structured(recipe)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml", resolve=True)
    model_cpu = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(out / "last.pt", {
        "model": model_cpu, "signature": model_signature(model), "model_name": name,
        "converted_from": str(source), "sparsity": OmegaConf.to_container(cfg.sparsity)})


def run_mask(cfg: DictConfig, out_dir: Path) -> dict:
    """Mask report (and conversion) of a trained model; writes mask.json, mask.md, sparse/ into out_dir."""
    hook, convert_enabled = _settings(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    source = checkpoint_path(cfg.checkpoint)
    run = load_train_run(str(source), "mask")
    run_cfg, model, bundle, name = run.cfg, run.model, run.bundle, run.name
    if not any(True for _ in quant_layers(model)):  # a plain fp32 run: make the layers mask-capable
        convert(model, lambda slot, module: None, NoiseContext(seed=run_cfg.seed))
    had_masks = _fold_masks(model)
    model.to(device)
    c = cfg.convert
    t0 = time.perf_counter()
    acc_dense = accuracy(model, bundle.test, cfg.eval_batch_size, device)
    t_eval = time.perf_counter() - t0

    hook.attach(model)  # magnitude masks of the dense weights (the classifier and excluded layers stay dense)
    rows = _layer_rows(model, hook)
    acc_magnitude = accuracy(model, bundle.test, cfg.eval_batch_size, device)
    summary = {
        "checkpoint": str(source), "model": name, "dataset": bundle.name,
        "sparsity": {"kind": hook.kind, "n": hook.n, "m": hook.m, "method": hook.method,
                     "convention": "n kept of every m"},
        "masked": list(hook.names), "kept_dense": _kept_dense(model, hook.names, hook),
        "checkpoint_had_masks": had_masks,
        "density": hook.densities(model),  # of the masks applied (method), kept per layer
        # over the layers that tile exactly (the others have no diversity formula)
        "log10_md": sum(r["log10_md"] for r in rows if r["log10_md"] is not None),
        "log10_md_unstructured": sum(r["log10_md_unstructured"] for r in rows if r["log10_md"] is not None),
        "accuracy": {"dense": acc_dense, "magnitude": acc_magnitude, "reconstructed": None},
        "timing_s": {"masks": sum(r["mask_ms"] + (r["greedy_ms"] or 0.0) for r in rows) / 1e3,
                     "evaluation": t_eval},
        "layers": rows,
    }
    if convert_enabled:
        batches = calibration_batches(bundle.train, c.calibration_batches, c.batch_size, cfg.seed, device)
        if c.bn and any(isinstance(mod, BN_TYPES) for mod in model.modules()):
            # BN re-estimation alone, to tell its share of the recovery from the reconstruction's
            only_bn = copy.deepcopy(model)
            reestimate_bn(only_bn, batches)
            summary["accuracy"]["magnitude_bn"] = accuracy(only_bn, bundle.test, cfg.eval_batch_size, device)
            del only_bn
        t0 = time.perf_counter()
        errors = {r["layer"]: r for r in reconstruct(model, hook.names, batches, c.damping)}
        t1 = time.perf_counter()
        bn_count = reestimate_bn(model, batches) if c.bn else 0
        t2 = time.perf_counter()
        summary["accuracy"]["reconstructed"] = accuracy(model, bundle.test, cfg.eval_batch_size, device)
        for r in rows:
            e = errors[r["layer"]]
            r.update(rel_err_magnitude=e["rel_err_magnitude"], rel_err_reconstructed=e["rel_err_reconstructed"],
                     rows_kept_magnitude=e["rows_kept_magnitude"])
        summary["timing_s"].update(reconstruction=t1 - t0, bn_reestimation=t2 - t1)
        summary["calibration"] = {"batches": len(batches), "samples": sum(len(x) for x in batches),
                                  "damping": c.damping, "bn_layers_reestimated": bn_count}
        summary["sparse_checkpoint"] = str(_save_sparse(out_dir / "sparse", run_cfg, model, name, source, hook))
    write_json(out_dir / "mask.json", summary)
    (out_dir / "mask.md").write_text(markdown(summary), encoding="utf-8")
    _print(summary, out_dir)
    return summary


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _layer_cells(r: dict) -> list[str]:
    return [r["layer"], "x".join(map(str, r["shape"])), f"{r['density']:.3f}", f"{r['kept_vs_unstructured']:.4f}",
            _f(r["greedy_vs_exact"], ".4f"), _f(r["log10_md"], ".1f"), f"{r['log10_md_unstructured']:.1f}",
            f"{r['mask_ms']:.1f}", _f(r["greedy_ms"], ".1f"),
            _f(r.get("rel_err_magnitude"), ".4f"), _f(r.get("rel_err_reconstructed"), ".4f")]


HEADER = ["layer", "shape", "dens", "kept", "greedy", "MD", "MD unstr", "ms", "ms gr", "err mag", "err rec"]
LEGEND = ("dens, kept: of the exact mask; dens: fraction kept; kept: kept |w| over unstructured top-k at the same density; greedy: greedy "
          "over exact kept |w| (transposable); MD: log10 mask diversity of the constraint (- where the layer's "
          "dimensions are not multiples of M) and of unstructured; ms / ms gr: exact / greedy mask search; "
          "err: output error ||W X - W' X||^2 / ||W X||^2 on the calibration batches, magnitude-only / "
          "reconstructed")


def _accuracy_rows(s: dict) -> list[tuple[str, str]]:
    a = s["accuracy"]
    rows = [("dense (as loaded)", f"{a['dense']:.4f}"), ("magnitude masks only", f"{a['magnitude']:.4f}")]
    if a.get("magnitude_bn") is not None:
        rows.append(("magnitude masks + BN re-estimation", f"{a['magnitude_bn']:.4f}"))
    if a["reconstructed"] is not None:
        cal = s["calibration"]
        bn = " + BN re-estimation" if cal["bn_layers_reestimated"] else ""
        rows.append((f"reconstructed{bn} ({cal['samples']} calibration samples)",
                     f"{a['reconstructed']:.4f}"))
    return rows


def markdown(s: dict) -> str:
    sp = s["sparsity"]
    label = f"{sp['n']}:{sp['m']}{' transposable (' + sp['method'] + ')' if sp['kind'] == 'transposable' else ''}"
    text = [f"## fqtrun mask: {s['model']} / {s['dataset']}, {label} (N kept of every M)\n",
            markdown_table(HEADER, [_layer_cells(r) for r in s["layers"]]),
            f"{LEGEND}. Kept dense: {', '.join(f'{k} ({v})' for k, v in s['kept_dense'].items()) or 'none'}.\n",
            markdown_table(["model", "test accuracy"], [[k, v] for k, v in _accuracy_rows(s)])]
    if s.get("sparse_checkpoint"):
        text.append(f"Sparse checkpoint: `{s['sparse_checkpoint']}`\n")
    return "\n".join(text)


def _print(s: dict, out_dir: Path) -> None:
    console = make_console()
    if not console.is_terminal:  # piped or logged: room for full layer names
        console.width = max(console.width, 110)
    sp = s["sparsity"]
    table = Table(title=f"fqtrun mask: {s['model']}, {sp['kind']} {sp['n']}:{sp['m']} ({sp['method']})",
                  title_justify="left", caption=LEGEND, caption_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    cols = [0, 2, 3, 4, 5, 7, 8, 9, 10]  # the terminal table leaves out shape and unstructured MD (see mask.md)
    for i in cols:
        table.add_column(HEADER[i], justify="left" if i == 0 else "right", no_wrap=True)
    for r in s["layers"]:
        cells = _layer_cells(r)
        table.add_row(*(cells[i] for i in cols))
    console.print(table)
    rows = _accuracy_rows(s) + [
        ("log10 mask diversity", f"{s['log10_md']:.1f} (unstructured {s['log10_md_unstructured']:.1f}; "
                                 "layers that tile exactly)"),
        ("kept dense", ", ".join(s["kept_dense"]) or "none"),
        ("time: masks / reconstruction / BN", " / ".join(f"{1e3 * s['timing_s'][k]:.1f} ms" if k in s["timing_s"]
                                                      else "-" for k in ("masks", "reconstruction", "bn_reestimation"))),
        ("outputs", str(out_dir / "mask.json") + (f", {s['sparse_checkpoint']}" if s.get("sparse_checkpoint") else "")),
    ]
    console.print(summary_table("test accuracy", rows))


@hydra.main(version_base="1.3", config_path="../conf", config_name="mask")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_mask, cfg)
