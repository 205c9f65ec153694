"""Roofline device model: the shipped data has sources, the model is monotone, calibration is exact on
synthetic points and no worse than uncalibrated on the published ones; arch estimates are labelled."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from ditnas.arch import Arch, SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models.roofline import (
    CalibrationPoint,
    RooflineModel,
    calibrate,
    default_model,
    estimate_arch,
    load_devices,
    published_step_cost,
    validate_devices,
)
from ditnas.supernet.model import ElasticDiT


def _raw() -> dict:
    from importlib import resources

    return yaml.safe_load(resources.files("ditnas.latency_models").joinpath("devices.yaml").read_text())


def test_shipped_devices_valid_and_sourced() -> None:
    raw = _raw()
    assert validate_devices(raw) == []
    cat = load_devices()
    assert {"iphone16promax", "sd8gen3"} <= set(cat.devices)
    for dev in cat.devices.values():
        assert dev.bandwidth > 1e10
        for unit in ("npu" if dev.key == "sd8gen3" else "ane", "gpu", "cpu"):
            assert dev.units[unit].peak_flops["fp16"] > 0
    # the roofline uses the FP16 peak, never the marketing INT8 TOPS
    ane = cat.device("iphone16promax").units["ane"]
    assert ane.marketing_int8_tops == 35 and ane.peak_flops["fp16"] == 17.5e12
    assert RooflineModel.for_device("iphone16promax").peak_flops == 17.5e12
    # every published point has a latency, params and a (finite, positive) cost estimate
    assert {p.name for p in cat.points} >= {"snapgenpp-tiny", "snapgenpp-small", "snapgenpp-full-4bit", "snapgen-unet"}
    for p in cat.points:
        assert math.isfinite(p.flops) and p.flops > 0 and p.bytes_moved > 0 and p.source


def test_validation_catches_unsourced_numbers(tmp_path) -> None:
    raw = _raw()
    raw["devices"]["iphone16promax"]["memory"]["bandwidth_gbs"] = {"value": 60.0}  # source removed
    raw["devices"]["sd8gen3"]["units"]["gpu"]["peak_fp16_tflops"]["confidence"] = "sure"
    problems = validate_devices(raw)
    assert any("bandwidth_gbs.value = 60.0 has no source" in p for p in problems)
    assert any("confidence" in p for p in problems)
    bad = tmp_path / "devices.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(DitnasError, match="no source"):
        load_devices(bad)
    with pytest.raises(DitnasError, match="cannot read"):
        load_devices(tmp_path / "missing.yaml")
    with pytest.raises(DitnasError, match="unknown device"):
        RooflineModel.for_device("pixel9")
    with pytest.raises(DitnasError, match="compute unit"):
        RooflineModel.for_device("iphone16promax", "tpu")


def test_roofline_monotone() -> None:
    m = RooflineModel("d", "u", peak_flops=1e12, bandwidth=5e10, overhead_ms=0.5)
    grid = [0.0, 1e9, 1e10, 1e11, 1e12]
    for fl in grid:
        ms = [m.estimate(fl, b) for b in grid]
        assert ms == sorted(ms)
    for b in grid:
        ms = [m.estimate(fl, b) for fl in grid]
        assert ms == sorted(ms)
    assert m.estimate(1e12, 0) == pytest.approx(1000.5)
    assert m.estimate(0, 5e10) == pytest.approx(1000.5)
    assert m.bound(1e12, 1e9) == "compute" and m.bound(1e9, 1e12) == "memory"
    with pytest.raises(DitnasError):
        m.estimate(-1, 0)


@pytest.mark.parametrize("fit_overhead", [False, True])
def test_calibration_recovers_synthetic_points(fit_overhead: bool) -> None:
    base = RooflineModel("d", "u", peak_flops=10e12, bandwidth=60e9, overhead_ms=0.0 if fit_overhead else 1.5)
    truth = RooflineModel("d", "u", 10e12, 60e9, compute_eff=0.3, memory_eff=0.55, overhead_ms=4.0 if fit_overhead else 1.5)
    specs = [(1e12, 1e9), (3e12, 2e9), (5e11, 5e8), (1e11, 1e10), (2e11, 2.5e10), (5e10, 6e9)]
    points = [CalibrationPoint(f"p{i}", "d", "u", truth.estimate(f, b), f, b) for i, (f, b) in enumerate(specs)]
    assert {truth.bound(f, b) for f, b in specs} == {"compute", "memory"}
    fitted = base.calibrate(points, fit_overhead=fit_overhead)
    assert fitted.compute_eff == pytest.approx(0.3, rel=1e-9)
    assert fitted.memory_eff == pytest.approx(0.55, rel=1e-9)
    assert fitted.overhead_ms == pytest.approx(truth.overhead_ms, rel=1e-9, abs=1e-9)
    assert fitted.fit is not None and fitted.fit.rms_rel_err < 1e-9
    assert all(fitted.fit.identified[k] for k in ("compute_eff", "memory_eff"))


def test_calibration_on_published_points() -> None:
    m = calibrate("iphone16promax")
    fit = m.fit
    assert fit is not None
    assert all(math.isfinite(r["rel_err"]) and math.isfinite(r["predicted_ms"]) for r in fit.rows)
    assert math.isfinite(fit.rms_rel_err) and fit.rms_rel_err <= fit.uncalibrated_rms_rel_err
    assert 0 < m.compute_eff and 0 < m.memory_eff
    assert "snapgenpp-small" in fit.table() and "not fitted" in fit.table()  # the U-Net is reported only
    with pytest.raises(DitnasError, match="no published latency"):
        calibrate("sd8gen3")
    # the Snapdragon borrows the iPhone efficiencies, with its own peaks
    sd = default_model("sd8gen3")
    assert sd.compute_eff == m.compute_eff and sd.peak_flops == 22.5e12 and "transferred" in sd.calibration


def test_published_cost_formula() -> None:
    cost = {"width": 64, "head_dim": 32, "weight_bits": 16, "groups": [{"layers": 2, "tokens": 10, "kv_tokens": 10}]}
    flops, nbytes = published_step_cost(cost, params=1000)
    assert flops == 2 * (2 * 500 * 10 + 4 * 10 * 10 * 64)
    assert nbytes == 1000 * 2 + 2 * 2 * (2 * 11 * 10 * 64 + 2 * 2 * 10 * 10)


def test_estimate_arch_labelled() -> None:
    space = SearchSpace(depth=2, ops=("sa", "lcha"), widths=(0.5, 1.0), mlp_ratios=(2.0, 4.0), stage_pattern=(0, 1))
    torch.manual_seed(0)
    net = ElasticDiT(space, ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1))
    small = Arch.parse("lcha:0.5:2 | lcha:0.5:2 |", defaults=space.max_arch())
    big = space.max_arch()
    for device in ("iphone16promax", "sd8gen3"):
        a, b = estimate_arch(net, small, device), estimate_arch(net, big, device)
        assert a.label == b.label == "estimate" and a.notes
        assert 0 < a.ms_per_forward <= b.ms_per_forward and a.flops < b.flops
        assert b.ms_total == pytest.approx(b.ms_per_forward * big.steps)
