"""LatencyPredictor: table sum, interpolation, per-op regressor, whole-model calibration, validation and
the closed loop. Real host-torch measurements on a tiny supernet (never asserting on absolute times)
plus hand-made tables where the right answer is known exactly."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models import (
    ProfilingSession,
    cells_for_arch,
    cells_for_space,
    programs_for_cells,
)
from ditnas.latency_models.backends.host_torch import HostTorchBackend
from ditnas.latency_models.predictor import (
    PREDICTOR,
    Calibration,
    LatencyPredictor,
    remeasure,
)
from ditnas.latency_models.programs import Cell
from ditnas.latency_models.table import LatencyTable
from ditnas.supernet.model import ElasticDiT

WARMUP, ITERS = 2, 5
CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)
SPACE = SearchSpace(
    depth=3, stage_pattern=(0, 1, 0), skippable=(1,), widths=(0.5, 1.0), mlp_ratios=(2.0, 4.0), ops=("sa", "lcha", "ssa")
)
# a denser space for the synthetic tables: a middle width and ratio to interpolate at
DENSE = SearchSpace(
    depth=3, stage_pattern=(0, 1, 0), skippable=(1,), widths=(0.5, 0.75, 1.0), mlp_ratios=(2.0, 3.0, 4.0),
    ops=("sa", "lcha", "ssa"),
)
HOST = {"device_id": "test-host", "device_model": "cpu", "backend": "host-torch", "precision": "fp32",
        "compute_unit": "cpu", "threads": 1}
OP_BASE = {"sa": 0.10, "lcha": 0.20, "ssa": 0.05}


def synthetic(space: SearchSpace, e: float = 2.0) -> pd.DataFrame:
    """Cell rows whose p50 is linear in tokens·width^e and tokens·width^e·mlp_ratio (exact answers)."""
    rows = []
    for c in cells_for_space(space):
        scale = c.tokens * c.width**e
        p50 = OP_BASE[c.op] + 1e-3 * scale + 5e-4 * scale * c.mlp_ratio if c.kind == "block" else 0.03 + 2e-4 * scale
        rows.append({**c.fields(), "p50": p50, "p10": 0.9 * p50, "p90": 1.2 * p50})
    return pd.DataFrame(rows)


def model_rows(archs: list[Arch], measured: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        [{**Cell("model", width=a.stream_width, tokens=a.tokens(0), arch=str(a)).fields(), "p50": m} for a, m in zip(archs, measured, strict=True)]
    )


def distinct_archs(space: SearchSpace, n: int, seed: int = 0) -> list[Arch]:
    rng, out = random.Random(seed), {}
    while len(out) < n:
        a = space.sample(rng)
        out[str(a)] = a
    return list(out.values())


# ----- real measurements -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def supernet() -> ElasticDiT:
    torch.manual_seed(0)
    return ElasticDiT(SPACE, CFG).eval()


@pytest.fixture(scope="module")
def session(tmp_path_factory, supernet) -> ProfilingSession:
    s = ProfilingSession.open(tmp_path_factory.mktemp("sess"), HostTorchBackend(threads=1), warmup=WARMUP, iters=ITERS)
    s.run(programs_for_cells(supernet, cells_for_space(SPACE)), HostTorchBackend(threads=1))
    return s


@pytest.fixture(scope="module")
def table(session) -> LatencyTable:
    return LatencyTable.from_sessions([session], space=SPACE, model=CFG)


def test_all_measured_arch_is_exactly_the_table_sum(table: LatencyTable) -> None:
    pred = LatencyPredictor.fit(table)  # space from the table manifest
    assert pred.space == SPACE and pred.calibration.method == "none"
    for arch in (SPACE.max_arch(), SPACE.min_arch(), SPACE.mid_arch()):
        detail = pred.predict_detail(arch)
        assert set(detail["source"]) == {"measured"}
        expected = sum(table.get(c.key()).p50 for c in cells_for_arch(SPACE, arch))
        assert pred.predict(arch, calibrated=False) == expected  # exact: same floats, same order
        assert pred.predict(arch) == expected  # no model rows: calibration is the identity
        assert list(detail["key"]) == [c.key() for c in cells_for_arch(SPACE, arch)]
        r = pred.predict_range(arch)
        assert r["p10"] <= r["p50"] <= r["p90"] and r["p50"] == pytest.approx(expected)


def test_closed_loop_remeasure_and_refit(table, supernet, session, tmp_path) -> None:
    archs = distinct_archs(SPACE, 3, seed=1)
    updated = remeasure(archs, supernet, session, HostTorchBackend(threads=1), table=table)
    models = updated.model_rows()
    assert sorted(models["arch"]) == sorted(str(a) for a in archs) and (models["p50"] > 0).all()
    assert len(updated.cell_rows()) == len(table.cell_rows())
    before = len(session.samples())
    again = remeasure(archs[:2], supernet, session, HostTorchBackend(threads=1), table=table)
    assert len(session.samples()) == before  # resumable: nothing measured twice
    assert again.table_id == updated.table_id
    pred = LatencyPredictor.fit(table).refit(updated)
    cal = pred.calibration
    assert cal.method == "ratio_median" and cal.n == 3 and "only 3 whole-model rows" in cal.note
    sums = [pred.predict(a, calibrated=False) for a in archs]
    ratios = [m / sums[[str(a) for a in archs].index(s)] for s, m in zip(models["arch"], models["p50"], strict=True)]
    assert cal.a == pytest.approx(float(np.median(ratios)))
    # the fitted predictor persists next to the table and comes back identical
    updated.save(tmp_path)
    pred.save(tmp_path)
    back = LatencyPredictor.load(tmp_path)
    assert (tmp_path / PREDICTOR).exists()
    for a in archs + [SPACE.max_arch()]:
        assert back.predict(a) == pytest.approx(pred.predict(a), rel=1e-12)
    with pytest.raises(DitnasError, match="refit"):
        LatencyPredictor.load(tmp_path, table=table)  # fitted on another table
    report = back.validate(updated)
    assert report["n"] == 3 and report["n_in_training"] == 3  # honest: these rows were fitted on


# ----- synthetic tables: exact answers -----------------------------------------------------------
def test_interpolation_is_exact_on_linear_data() -> None:
    for e in (1.0, 2.0):  # latency linear in tokens·width (e=1) or tokens·width² (the default)
        full = synthetic(DENSE, e)
        mid_w = Cell("block", "sa", 0.75, 4.0, 64, 0)
        mid_r = Cell("block", "lcha", 1.0, 3.0, 16, 1)
        mid_e = Cell("patch_embed", width=0.75, tokens=64)
        drop = {mid_w.key(), mid_r.key(), mid_e.key()}
        truth = full.set_index("key")["p50"]
        t = LatencyTable.from_frame(full[~full["key"].isin(drop)], HOST, space=DENSE)
        pred = LatencyPredictor.fit(t, width_exponent=e)
        for cell in (mid_w, mid_r, mid_e):
            p = pred.price(cell)
            assert p.source == "interpolated"
            assert p.p50 == pytest.approx(truth[cell.key()], rel=1e-12, abs=1e-12)
            assert p.p90 == pytest.approx(1.2 * truth[cell.key()], rel=1e-12)
        assert pred.price(mid_w).detail.startswith("width:") and pred.price(mid_r).detail.startswith("mlp_ratio:")
        arch = Arch((Slot("sa", 0.75, 4.0, 0), Slot("lcha", 1.0, 3.0, 1), Slot("ssa", 0.5, 2.0, 0)), 2, DENSE.latent, 10, 28)
        detail = pred.predict_detail(arch)
        assert list(detail["kind"]) == ["patch_embed", "block", "down", "block", "up", "block", "final"]
        assert sorted(detail["source"].unique()) == ["interpolated", "measured"]
        assert pred.predict(arch, calibrated=False) == pytest.approx(sum(truth[c.key()] for c in cells_for_arch(DENSE, arch)))


def test_regressor_path_is_labelled() -> None:
    full = synthetic(DENSE)
    # the widest, largest-ratio, full-resolution cell has no measured neighbour on both sides
    edge = Cell("block", "ssa", 1.0, 4.0, 64, 0)
    t = LatencyTable.from_frame(full[full["key"] != edge.key()], HOST, space=DENSE)
    pred = LatencyPredictor.fit(t)
    p = pred.price(edge)
    assert p.source == "regressed" and "block:ssa regressor" in p.detail
    # the data lie in the regressor's feature span, so least squares recovers it
    assert p.p50 == pytest.approx(full.set_index("key").loc[edge.key(), "p50"], rel=1e-6)
    assert p.p10 == pytest.approx(0.9 * p.p50) and p.p90 == pytest.approx(1.2 * p.p50)
    arch = Arch((Slot("ssa", 1.0, 4.0, 0), Slot("skip", stage=1), Slot("sa", 1.0, 4.0, 0)), 2, DENSE.latent, 10, 28)
    detail = pred.predict_detail(arch)
    assert detail.set_index("key").loc[edge.key(), "source"] == "regressed"
    assert (detail["source"] == "regressed").sum() == 1
    assert pred.report["regressors"]["block:ssa"]["n"] == 17  # 2 stages x 3 widths x 3 ratios, one dropped
    # no neighbours and too few cells to regress: a clear error
    only = full[(full["kind"] != "block") | (full["op"] != "lcha") | (full["key"] == Cell("block", "lcha", 0.5, 2.0, 64, 0).key())]
    lonely = LatencyPredictor.fit(LatencyTable.from_frame(only, HOST, space=DENSE))
    with pytest.raises(DitnasError, match="no regressor"):
        lonely.price(Cell("block", "lcha", 1.0, 4.0, 64, 0))


def test_calibration_recovers_known_coefficients() -> None:
    cells = synthetic(DENSE)
    base = LatencyPredictor.fit(LatencyTable.from_frame(cells, HOST, space=DENSE))
    archs = distinct_archs(DENSE, 8, seed=3)
    assert len({a.depth for a in archs}) > 1  # the block count varies (slot 1 is skippable)
    a, b, c = 1.15, 0.07, 0.3
    measured = [a * base.predict(x, calibrated=False) + b * x.depth + c for x in archs]
    t = LatencyTable.from_frame(pd.concat([cells, model_rows(archs, measured)], ignore_index=True), HOST, space=DENSE)
    pred = LatencyPredictor.fit(t)
    cal = pred.calibration
    assert cal.method == "linear" and cal.n == 8
    assert (cal.a, cal.b, cal.c) == pytest.approx((a, b, c), abs=1e-6)
    for x, m in zip(archs, measured, strict=True):
        assert pred.predict(x) == pytest.approx(m, abs=1e-6)
    assert pred.report["calibration"]["method"] == "linear" and pred.report["in_sample_within_10pct"] == 1.0
    # too few rows: the ratio median, and the report says so
    few = LatencyTable.from_frame(pd.concat([cells, model_rows(archs[:3], measured[:3])], ignore_index=True), HOST, space=DENSE)
    cal3 = LatencyPredictor.fit(few).calibration
    sums = [base.predict(x, calibrated=False) for x in archs[:3]]
    assert cal3.method == "ratio_median" and "only 3" in cal3.note
    assert cal3.a == pytest.approx(float(np.median(np.array(measured[:3]) / np.array(sums))))
    assert (cal3.b, cal3.c) == (0.0, 0.0)
    # a non-positive slope is not trusted either
    neg = Calibration.fit(np.array([1.0, 2, 3, 4, 5]), np.array([1, 2, 1, 2, 1]), np.array([5.0, 4, 3, 2, 1]), 5)
    assert neg.method == "ratio_median" and "non-positive slope" in neg.note


def test_validate_matches_a_hand_computation() -> None:
    cells = synthetic(DENSE)
    archs = distinct_archs(DENSE, 4, seed=5)
    pred = LatencyPredictor.fit(LatencyTable.from_frame(cells, HOST, space=DENSE))
    pred.calibration = Calibration("linear", 1.1, 0.02, 0.05, 6, "set by hand")
    sums = [pred.predict(x, calibrated=False) for x in archs]
    measured = [s * f for s, f in zip(sums, (1.0, 1.12, 1.30, 0.95), strict=True)]
    held = model_rows(archs, measured)
    out = pred.validate(held)
    cal = [1.1 * s + 0.02 * x.depth + 0.05 for s, x in zip(sums, archs, strict=True)]
    err = [(p - m) / m * 100 for p, m in zip(cal, measured, strict=True)]
    err_u = [(s - m) / m * 100 for s, m in zip(sums, measured, strict=True)]
    assert out["n"] == 4 and out["calibration"] == "linear" and out["n_in_training"] == 0
    assert out["within_10pct"] == pytest.approx(np.mean([abs(x) <= 10 for x in err]))
    assert out["within_10pct_uncalibrated"] == pytest.approx(np.mean([abs(x) <= 10 for x in err_u]))
    assert out["median_abs_err_pct"] == pytest.approx(float(np.median(np.abs(err))))
    assert out["median_abs_err_pct_uncalibrated"] == pytest.approx(float(np.median(np.abs(err_u))))
    rows = pd.DataFrame(out["rows"])
    assert list(rows["arch"]) == [str(x) for x in archs]
    assert rows["err_pct"].to_numpy() == pytest.approx(err) and rows["predicted_ms"].to_numpy() == pytest.approx(cal)
    with pytest.raises(DitnasError, match="no whole-model rows"):
        pred.validate(held.iloc[:0])
    with pytest.raises(DitnasError, match="lack columns"):
        pred.validate(held.drop(columns=["p50"]))


def test_prediction_refuses_a_table_of_another_device() -> None:
    t = LatencyTable.from_frame(synthetic(DENSE), HOST, space=DENSE)
    pred = LatencyPredictor.fit(t)
    other = LatencyTable.from_frame(synthetic(DENSE), {**HOST, "device_id": "pixel-9"}, space=DENSE)
    with pytest.raises(DitnasError) as err:
        pred.refit(other)
    assert "pixel-9" in str(err.value) and "test-host" in str(err.value)
    with pytest.raises(DitnasError, match="records no search space"):
        LatencyPredictor.fit(LatencyTable.from_frame(synthetic(DENSE), HOST))
