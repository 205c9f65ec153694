"""Roofline latency **estimates** for phones nobody measured: iPhone 16 Pro Max and a Snapdragon 8 Gen 3.

    ms = max(flops / (peak * compute_eff), bytes / (bandwidth * memory_eff)) * 1e3 + overhead_ms

Peaks and bandwidths come from `devices.yaml` (package data; every number has a source and a
confidence). The efficiencies are **calibrated** by relative least squares on published per-step
latencies (SnapGen++ on the iPhone 16 Pro Max, method.md §2.2, §2.7, §5.1) whose FLOPs and bytes are
themselves our estimates ([I], `published_step_cost`). The fit residuals are kept with the model
(`RooflineModel.fit`). A device without published points borrows another device's efficiencies
(`calibrate_from` in the YAML). Everything returned here is labelled `estimate`; measured tables
(table.py / predictor.py) always take precedence.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ditnas.arch import Arch
from ditnas.errors import DitnasError
from ditnas.latency_models.flops import arch_bytes_moved, arch_macs_analytic
from ditnas.supernet.model import ElasticDiT

__all__ = [
    "CalibrationPoint",
    "Catalog",
    "ComputeUnit",
    "Device",
    "FitReport",
    "LatencyEstimate",
    "RooflineModel",
    "calibrate",
    "default_model",
    "estimate_arch",
    "load_devices",
    "published_step_cost",
    "validate_devices",
]

CONFIDENCE = ("high", "medium", "low")
ACT_TENSORS = 11  # N x d activation tensors per block (as flops.block_memory_elements: 3 base + 3 qkv + 1 cross + 4 ffn)
ACT_BYTES = 2  # assumption: FP16 activations on device


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComputeUnit:
    name: str
    description: str
    peak_flops: dict[str, float]  # precision ("fp16", "fp32") -> FLOP/s
    overhead_ms: float
    marketing_int8_tops: float | None = None  # shown, never used as a peak


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    soc: str
    bandwidth: float  # bytes/s
    units: dict[str, ComputeUnit]
    default_unit: str
    calibrate_from: tuple[str, str] | None = None  # (device, unit) whose efficiencies to borrow

    def unit(self, name: str | None) -> ComputeUnit:
        name = name or self.default_unit
        if name not in self.units:
            raise DitnasError(f"device {self.key}: no compute unit {name!r}; known: {', '.join(self.units)}")
        return self.units[name]


@dataclass(frozen=True)
class CalibrationPoint:
    """One published latency with our estimate of its cost. `fit=False` points are reported, not fitted."""

    name: str
    device: str
    unit: str
    ms: float
    flops: float
    bytes_moved: float
    params: float = 0.0
    fit: bool = True
    source: str = ""


@dataclass(frozen=True)
class Catalog:
    devices: dict[str, Device]
    points: tuple[CalibrationPoint, ...]
    path: str

    def device(self, key: str) -> Device:
        if key not in self.devices:
            raise DitnasError(f"unknown device {key!r} in {self.path}; known: {', '.join(self.devices)}")
        return self.devices[key]

    def points_for(self, device: str, unit: str, *, fitted_only: bool = True) -> list[CalibrationPoint]:
        return [p for p in self.points if p.device == device and p.unit == unit and (p.fit or not fitted_only)]


def validate_devices(raw: Any, where: str = "devices.yaml") -> list[str]:
    """Problems of a devices file (empty when valid): every number needs a `source` in its mapping or
    an enclosing one; confidences are high/medium/low; values are finite and positive."""
    problems: list[str] = []

    def walk(node: Any, path: str, sourced: bool) -> None:
        if isinstance(node, dict):
            has = sourced or bool(node.get("source"))
            if "confidence" in node and node["confidence"] not in CONFIDENCE:
                problems.append(f"{path}.confidence = {node['confidence']!r} (use {'/'.join(CONFIDENCE)})")
            if "source" in node and not (isinstance(node["source"], str) and node["source"].strip()):
                problems.append(f"{path}.source is empty")
            for k, v in node.items():
                if k != "schema":
                    walk(v, f"{path}.{k}", has)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]", sourced)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            if not sourced:
                problems.append(f"{path} = {node} has no source")
            if not math.isfinite(node) or node <= 0:
                problems.append(f"{path} = {node} must be finite and > 0")

    if not isinstance(raw, dict) or not isinstance(raw.get("devices"), dict):
        return [f"{where}: needs a 'devices' mapping"]
    walk(raw, "", False)
    for key, dev in raw["devices"].items():
        for req in ("name", "memory", "units", "default_unit"):
            if req not in dev:
                problems.append(f"devices.{key}: missing {req!r}")
        if "bandwidth_gbs" not in dev.get("memory", {}):
            problems.append(f"devices.{key}.memory: missing bandwidth_gbs")
        for uname, unit in dev.get("units", {}).items():
            for req in ("peak_fp16_tflops", "overhead_ms"):
                if req not in unit:
                    problems.append(f"devices.{key}.units.{uname}: missing {req!r}")
        if dev.get("default_unit") not in dev.get("units", {}):
            problems.append(f"devices.{key}: default_unit {dev.get('default_unit')!r} is not one of its units")
    for i, point in enumerate(raw.get("calibration", [])):
        for req in ("name", "device", "unit", "per_step_ms", "params", "cost"):
            if req not in point:
                problems.append(f"calibration[{i}]: missing {req!r}")
        if point.get("device") not in raw["devices"]:
            problems.append(f"calibration[{i}]: device {point.get('device')!r} unknown")
    return problems


def _value(node: Any, where: str) -> float:
    if not isinstance(node, dict) or "value" not in node:
        raise DitnasError(f"{where}: expected a mapping with 'value' and 'source'")
    return float(node["value"])


def published_step_cost(cost: dict, params: float) -> tuple[float, float]:
    """(FLOPs, bytes) per forward of a published DiT from its `cost` spec. An **estimate** ([I]):

    flops = sum_g layers_g * (2 * params / L * tokens_g + 4 * tokens_g * kv_g * width)
    bytes = params * weight_bits / 8 + sum_g layers_g * 2 B * (2 * 11 * tokens_g * width + 2 * heads * tokens_g * kv_g)

    (every parameter one MAC per token -- embeddings and text layers included, an overcount -- plus
    QK^T and AV; traffic = weights once, ~11 N x d tensors per block and the attention matrix, each
    written and read once). A spec with explicit `flops` and `bytes` is returned as is.
    """
    if "flops" in cost and "bytes" in cost:
        return float(cost["flops"]), float(cost["bytes"])
    groups = cost["groups"]
    width, head_dim = float(cost["width"]), float(cost["head_dim"])
    heads = width / head_dim
    layers = sum(g["layers"] for g in groups)
    per_layer = params / layers
    flops = sum(g["layers"] * (2 * per_layer * g["tokens"] + 4 * g["tokens"] * g["kv_tokens"] * width) for g in groups)
    act = sum(
        g["layers"] * (2 * ACT_TENSORS * g["tokens"] * width + 2 * heads * g["tokens"] * g["kv_tokens"]) for g in groups
    )
    return flops, params * float(cost["weight_bits"]) / 8 + ACT_BYTES * act


def load_devices(path: str | Path | None = None) -> Catalog:
    """Read and validate a devices file (the packaged `devices.yaml` by default)."""
    if path is None:
        text = resources.files("ditnas.latency_models").joinpath("devices.yaml").read_text()
        where = "ditnas/latency_models/devices.yaml"
    else:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise DitnasError(f"cannot read devices file {where}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DitnasError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    problems = validate_devices(raw, where)
    if problems:
        raise DitnasError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems[:5]))
    devices: dict[str, Device] = {}
    for key, dev in raw["devices"].items():
        units = {}
        for uname, u in dev["units"].items():
            peaks = {"fp16": _value(u["peak_fp16_tflops"], f"{key}.{uname}") * 1e12}
            if "peak_fp32_tflops" in u:
                peaks["fp32"] = _value(u["peak_fp32_tflops"], f"{key}.{uname}") * 1e12
            tops = u.get("marketing_int8_tops")
            units[uname] = ComputeUnit(
                uname,
                u.get("description", ""),
                peaks,
                _value(u["overhead_ms"], f"{key}.{uname}.overhead_ms"),
                _value(tops, f"{key}.{uname}") if tops else None,
            )
        cf = dev.get("calibrate_from")
        devices[key] = Device(
            key,
            dev["name"],
            dev.get("soc", ""),
            _value(dev["memory"]["bandwidth_gbs"], f"{key}.memory.bandwidth_gbs") * 1e9,
            units,
            dev["default_unit"],
            (cf["device"], cf["unit"]) if cf else None,
        )
    points = []
    for p in raw.get("calibration", []):
        params = _value(p["params"], p["name"])
        flops, nbytes = published_step_cost(p["cost"], params)
        points.append(
            CalibrationPoint(
                p["name"], p["device"], p["unit"], _value(p["per_step_ms"], p["name"]), flops, nbytes, params,
                bool(p.get("fit", True)), p["per_step_ms"].get("source", ""),
            )
        )
    return Catalog(devices, tuple(points), where)


# ----------------------------------------------------------------------------------------------
# the model and its calibration
# ----------------------------------------------------------------------------------------------
@dataclass
class FitReport:
    """How well a calibrated roofline reproduces its points (relative errors, signed: (pred - meas) / meas)."""

    rows: list[dict]  # name, measured_ms, predicted_ms, uncalibrated_ms, rel_err, uncal_rel_err, bound, fitted
    rms_rel_err: float  # over fitted points
    uncalibrated_rms_rel_err: float
    max_abs_rel_err: float
    identified: dict[str, bool]  # which parameters the points determine
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'point':28s} {'meas ms':>9s} {'pred ms':>9s} {'err':>7s} {'uncal ms':>9s} bound"]
        for r in self.rows:
            mark = "" if r["fitted"] else " (not fitted)"
            lines.append(
                f"{r['name']:28s} {r['measured_ms']:9.1f} {r['predicted_ms']:9.1f} {100 * r['rel_err']:6.1f}% "
                f"{r['uncalibrated_ms']:9.2f} {r['bound']}{mark}"
            )
        lines.append(f"rms rel err {100 * self.rms_rel_err:.1f}% (uncalibrated {100 * self.uncalibrated_rms_rel_err:.1f}%)")
        return "\n".join(lines)


@dataclass(frozen=True)
class RooflineModel:
    """max(compute time, memory time) + overhead on one compute unit of one device."""

    device: str
    unit: str
    peak_flops: float  # FLOP/s at `precision`
    bandwidth: float  # bytes/s
    compute_eff: float = 1.0
    memory_eff: float = 1.0
    overhead_ms: float = 0.0
    precision: str = "fp16"
    calibration: str = "uncalibrated (peak figures)"
    fit: FitReport | None = None

    @classmethod
    def for_device(
        cls, device: str, unit: str | None = None, *, precision: str = "fp16", catalog: Catalog | None = None
    ) -> RooflineModel:
        """The uncalibrated roofline (efficiency 1) of a device's unit."""
        cat = catalog or load_devices()
        dev = cat.device(device)
        cu = dev.unit(unit)
        if precision not in cu.peak_flops:
            raise DitnasError(f"{device}/{cu.name}: no {precision} peak; known: {', '.join(cu.peak_flops)}")
        return cls(device, cu.name, cu.peak_flops[precision], dev.bandwidth, overhead_ms=cu.overhead_ms, precision=precision)

    # per-unit costs in ms
    @property
    def ms_per_flop(self) -> float:
        return 1e3 / (self.peak_flops * self.compute_eff)

    @property
    def ms_per_byte(self) -> float:
        return 1e3 / (self.bandwidth * self.memory_eff)

    def estimate(self, flops: float, bytes_moved: float) -> float:
        """Estimated milliseconds for `flops` FLOPs and `bytes_moved` bytes of DRAM traffic."""
        if flops < 0 or bytes_moved < 0:
            raise DitnasError(f"roofline: flops ({flops}) and bytes ({bytes_moved}) must be >= 0")
        return max(flops * self.ms_per_flop, bytes_moved * self.ms_per_byte) + self.overhead_ms

    def bound(self, flops: float, bytes_moved: float) -> str:
        return "compute" if flops * self.ms_per_flop >= bytes_moved * self.ms_per_byte else "memory"

    def with_efficiencies(self, other: RooflineModel, note: str = "") -> RooflineModel:
        """This device's peaks with `other`'s fitted efficiencies (a transfer; keeps own overhead)."""
        label = f"efficiencies transferred from {other.device}/{other.unit} ({other.calibration})"
        return replace(
            self, compute_eff=other.compute_eff, memory_eff=other.memory_eff, calibration=note or label, fit=other.fit
        )

    def calibrate(self, points: list[CalibrationPoint], *, fit_overhead: bool = False) -> RooflineModel:
        """Fit compute_eff, memory_eff (and overhead if asked) to `points` by relative least squares.

        The max() makes the model piecewise linear: every split of the fitted points into compute- and
        memory-bound is tried, each solved by weighted linear least squares (weights 1/measured, i.e.
        relative errors), and the split whose *true* max-model error is lowest wins. The uncalibrated
        model is a candidate too, so the fit is never worse than it. Exact on data the model generated.
        """
        fitted = [p for p in points if p.fit]
        if not fitted:
            raise DitnasError(f"roofline {self.device}/{self.unit}: no calibration points to fit (all fit: false?)")
        if len(fitted) > 16:
            raise DitnasError(f"roofline: {len(fitted)} points; the exhaustive fit takes at most 16")
        f = np.array([p.flops for p in fitted], dtype=float)
        b = np.array([p.bytes_moved for p in fitted], dtype=float)
        t = np.array([p.ms for p in fitted], dtype=float)
        prior = np.array([self.ms_per_flop, self.ms_per_byte, self.overhead_ms])

        def loss(theta: np.ndarray) -> float:
            pred = np.maximum(theta[0] * f, theta[1] * b) + theta[2]
            return float(np.sum(((pred - t) / t) ** 2))

        best, best_loss, best_ident = prior, loss(prior), {"compute_eff": False, "memory_eff": False, "overhead": False}
        n = len(fitted)
        for mask in itertools.product((True, False), repeat=n):
            comp = np.array(mask)
            for theta, ident in _solve_split(f, b, t, comp, prior, fit_overhead):
                cand = loss(theta)
                if cand < best_loss - 1e-15:
                    best, best_loss, best_ident = theta, cand, ident
        a_ms, b_ms, o_ms = best
        model = replace(
            self,
            compute_eff=float(1e3 / (self.peak_flops * a_ms)),
            memory_eff=float(1e3 / (self.bandwidth * b_ms)),
            overhead_ms=float(o_ms),
            calibration=f"fitted on {n} published point(s) of {self.device}/{self.unit}",
        )
        return replace(model, fit=_report(model, self, points, best_ident))


def _solve_split(
    f: np.ndarray, b: np.ndarray, t: np.ndarray, comp: np.ndarray, prior: np.ndarray, fit_overhead: bool
) -> list[tuple[np.ndarray, dict[str, bool]]]:
    """Least-squares (a, b, o) for one compute/memory split; [] if it gives no valid (positive) model."""
    w = 1.0 / t
    out = []
    for with_o in ((True, False) if fit_overhead else (False,)):
        cols, names = [], []
        if comp.any():
            cols.append(np.where(comp, f, 0.0))
            names.append("a")
        if (~comp).any():
            cols.append(np.where(comp, 0.0, b))
            names.append("b")
        if with_o:
            cols.append(np.ones_like(t))
            names.append("o")
        o_fixed = 0.0 if with_o else (prior[2] if not fit_overhead else 0.0)
        x = np.stack(cols, axis=1) * w[:, None]
        y = (t - o_fixed) * w
        sol, *_ = np.linalg.lstsq(x, y, rcond=None)
        theta = dict(zip(names, sol))
        if any(theta.get(k, 1.0) <= 0 for k in ("a", "b")) or theta.get("o", 0.0) < 0:
            continue
        a = theta.get("a")
        bb = theta.get("b")
        # a parameter no point determines keeps its prior, clipped so the split stays consistent
        if a is None:
            a = min(prior[0], float(np.min(bb * b / f)))
        if bb is None:
            bb = min(prior[1], float(np.min(a * f / b)))
        ident = {"compute_eff": "a" in theta, "memory_eff": "b" in theta, "overhead": "o" in theta}
        out.append((np.array([a, bb, theta.get("o", o_fixed)]), ident))
    return out


def _report(model: RooflineModel, prior: RooflineModel, points: list[CalibrationPoint], ident: dict) -> FitReport:
    rows = []
    for p in points:
        pred, unc = float(model.estimate(p.flops, p.bytes_moved)), float(prior.estimate(p.flops, p.bytes_moved))
        rows.append(
            {
                "name": p.name,
                "measured_ms": p.ms,
                "predicted_ms": pred,
                "uncalibrated_ms": unc,
                "rel_err": (pred - p.ms) / p.ms,
                "uncal_rel_err": (unc - p.ms) / p.ms,
                "bound": model.bound(p.flops, p.bytes_moved),
                "fitted": p.fit,
                "flops": p.flops,
                "bytes": p.bytes_moved,
            }
        )
    fitted = [r for r in rows if r["fitted"]]
    rms = math.sqrt(sum(r["rel_err"] ** 2 for r in fitted) / len(fitted))
    rms_u = math.sqrt(sum(r["uncal_rel_err"] ** 2 for r in fitted) / len(fitted))
    notes = []
    if model.compute_eff > 1 or model.memory_eff > 1:
        notes.append("an efficiency above 1: the points' FLOPs/bytes estimates are too high for the stated peaks")
    for k, v in ident.items():
        if not v and (k != "overhead"):
            notes.append(f"{k} not identified by the points (kept at its prior, clipped)")
    return FitReport(rows, rms, rms_u, float(max(abs(r["rel_err"]) for r in fitted)), dict(ident), notes)


def calibrate(
    device: str = "iphone16promax", unit: str | None = None, *, fit_overhead: bool = False, catalog: Catalog | None = None
) -> RooflineModel:
    """The roofline of `device`/`unit` fitted on its published points in the catalog."""
    cat = catalog or load_devices()
    base = RooflineModel.for_device(device, unit, catalog=cat)
    points = cat.points_for(device, base.unit, fitted_only=False)
    if not any(p.fit for p in points):
        raise DitnasError(f"no published latency points for {device}/{base.unit} in {cat.path}")
    return base.calibrate(points, fit_overhead=fit_overhead)


@functools.lru_cache(maxsize=16)
def default_model(device: str = "iphone16promax", unit: str | None = None) -> RooflineModel:
    """Calibrated on the device's own points if it has any, else with efficiencies borrowed per the
    YAML's `calibrate_from`, else uncalibrated (peak figures). Cached."""
    cat = load_devices()
    dev = cat.device(device)
    base = RooflineModel.for_device(device, unit, catalog=cat)
    if any(p.fit for p in cat.points_for(device, base.unit)):
        return calibrate(device, base.unit, catalog=cat)
    if dev.calibrate_from is not None:
        src_dev, src_unit = dev.calibrate_from
        return base.with_efficiencies(calibrate(src_dev, src_unit, catalog=cat))
    return base


# ----------------------------------------------------------------------------------------------
# pricing an arch
# ----------------------------------------------------------------------------------------------
@dataclass
class LatencyEstimate:
    """A roofline latency for one arch. **An estimate, not a measurement** (label says so)."""

    device: str
    unit: str
    ms_per_forward: float
    ms_total: float  # steps * forwards_per_step * ms_per_forward
    flops: int  # 2 * MACs per forward
    bytes_moved: int
    bound: str
    calibration: str
    label: str = "estimate"
    notes: list[str] = field(default_factory=list)


def estimate_arch(
    supernet: ElasticDiT,
    arch: Arch,
    device: str = "iphone16promax",
    unit: str | None = None,
    *,
    model: RooflineModel | None = None,
    dtype_bytes: int = 2,
    weight_bits: float | None = None,
    forwards_per_step: int = 1,
) -> LatencyEstimate:
    """Roofline estimate of one velocity call of `arch` (batch 1) and of `arch.steps` steps.

    FLOPs = 2 * closed-form MACs (flops.arch_macs_analytic, equal to the fvcore count); bytes =
    flops.arch_bytes_moved at `dtype_bytes` activations. `forwards_per_step=2` prices classifier-free
    guidance run as two calls.
    """
    rm = model or default_model(device, unit)
    flops = 2 * arch_macs_analytic(supernet, arch)
    nbytes = arch_bytes_moved(supernet, arch, dtype_bytes=dtype_bytes, weight_bits=weight_bits)
    ms = rm.estimate(flops, nbytes)
    notes = [
        "roofline estimate from published peak figures (devices.yaml); no device measured this arch",
    ]
    if rm.fit is not None:
        notes.append(f"calibration rms relative error on published points: {100 * rm.fit.rms_rel_err:.0f}%")
    return LatencyEstimate(
        rm.device, rm.unit, ms, ms * arch.steps * forwards_per_step, flops, nbytes, rm.bound(flops, nbytes),
        rm.calibration, notes=notes,
    )  # fmt: skip
