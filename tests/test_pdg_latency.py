"""Path-Drop Guidance priced (latency_models/pdg_latency.py, generation_latency.py): a PDG step is the full call plus
the dense-only call (brute force over the cells), the DP prices a PDG step exactly as the pricing does, the
generation fit is derived from the none fit until pdg generations are measured and recovers a known law when they
are, the profiled PDG denoiser is the sampler `ditnas sample --guidance pdg` runs, and a host profile times it."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from dp_checks import check_dp_prices_exactly

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models.generation_latency import generation_key
from ditnas.latency_models.pdg_latency import PathDropPricing
from ditnas.latency_models.predictor import Calibration, LatencyPredictor
from ditnas.latency_models.programs import Cell, cells_for_space
from ditnas.latency_models.table import LatencyTable

torch.set_num_threads(1)

IMG = SearchSpace(depth=6, ops=("sa", "lcha", "ssa"), widths=(0.5, 1.0), mlp_ratios=(2.0, 4.0), skippable=(0, 2, 3, 5),
                  stage_pattern=(0, 1, 1, 1, 1, 0), latent=(1, 1, 16, 16))
HOST = {"device_id": "test-host", "device_model": "cpu", "backend": "executorch-xnnpack", "precision": "fp32",
        "compute_unit": "cpu", "threads": 1}
CAL = Calibration("linear", 0.8, 0.13, 0.45, 12, "set by the test")


def _predictor(seed: int = 0) -> LatencyPredictor:
    """Every cell at a seeded random p50 (the sums must hold for any values) and a calibration with every term."""
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame([{**c.fields(), "p50": float(rng.uniform(0.1, 2.0))} for c in cells_for_space(IMG)])
    pred = LatencyPredictor.fit(LatencyTable.from_frame(rows, HOST, space=IMG))
    pred.calibration = CAL
    return pred


def _archs(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [IMG.max_arch(), IMG.min_arch()] + [IMG.sample(rng) for _ in range(n)]


def _dense_only_brute(pred: LatencyPredictor, arch, dense: int) -> float:
    """Full table sum minus the middle slots' block cells, calibrated with the blocks the dense-only net runs."""
    table = pred.table
    full = pred.predict(arch, calibrated=False)
    tokens = {r: IMG.max_arch().tokens(r) for r in (0, 1)}
    middle = [s for i, s in enumerate(arch.slots) if dense <= i < len(arch.slots) - dense and not s.is_skip]
    dropped = sum(float(table.get(Cell("block", s.op, s.width, s.mlp_ratio, tokens[s.stage], s.stage)).p50) for s in middle)
    blocks = arch.depth - len(middle)
    return CAL.a * (full - dropped) + CAL.b * blocks + CAL.c


def test_a_pdg_step_is_the_full_call_plus_the_dense_only_call():
    pred = _predictor()
    cheaper = 0
    for dense in (1, 2):
        for arch in _archs(10):
            d = pred.predict_dense_only(arch, dense)
            assert d == pytest.approx(_dense_only_brute(pred, arch, dense), rel=1e-12)
            assert pred.predict_step(arch, "pdg", dense) == pytest.approx(pred.predict(arch) + d, rel=1e-12)
            assert pred.predict_step(arch, "cfg", dense) == pred.predict_step(arch, "none") == pred.predict(arch)
            cheaper += d < pred.predict(arch) - 1e-9  # a middle with a block in it costs the dense-only net less
    assert cheaper >= 15
    with pytest.raises(DitnasError, match="leave no middle slot"):
        pred.predict_dense_only(IMG.max_arch(), 3)


def test_the_dp_prices_a_pdg_step_exactly_as_the_pricing():
    pricing = PathDropPricing(_predictor(seed=3), dense=1)
    assert pricing.slot_weights(6) == [2, 1, 1, 1, 1, 2]
    assert check_dp_prices_exactly(IMG, pricing, _archs(20)) >= 6


def _rows(pred, law, guidance: str, dense: int = 1, archs=None):
    alpha, beta, gamma = law
    out = []
    for arch in archs or _archs(5, seed=4):
        for steps in (4, 28):
            p = pred.predict_step(arch, guidance, dense)
            ms = alpha * steps * p + beta * steps + gamma
            out.append({"key": generation_key(str(arch), steps, guidance, dense), "arch": str(arch), "steps": steps,
                        "guidance": guidance, "threads": 1, "p50": ms, "p10": ms, "p90": ms, "n": 5})
    return pd.DataFrame(out)


def test_pdg_generations_are_derived_from_the_none_fit_until_measured_then_fitted():
    base = _predictor(seed=5)
    none_law, pdg_law = (0.62, 0.05, 1.3), (0.7, 0.11, 0.9)
    pred = LatencyPredictor.fit(base.table, generations=_rows(base, none_law, "none"))
    pred.calibration = CAL
    pred.fit_generation(_rows(pred, none_law, "none"))
    fit = pred.generation.fit_for("pdg")
    assert fit.method == "derived_from_none" and (fit.alpha, fit.beta, fit.gamma) == pytest.approx((0.62, 0.10, 1.3))
    assert "derived from the none fit" in pred.generation.definition("pdg", 28)
    assert "2 batch-1 calls per step (PDG" in pred.generation.definition("pdg", 28)
    arch = _archs(3, seed=8)[-1]
    both = pred.predict(arch) + pred.predict_dense_only(arch, 1)
    assert pred.predict_generation(arch, 28, "pdg") == pytest.approx(0.62 * 28 * both + 0.10 * 28 + 1.3, rel=1e-9)
    assert PathDropPricing(pred, 1).predict_generation(arch, 28) == pytest.approx(pred.predict_generation(arch, 28, "pdg"))
    # measured pdg generations (dense 2): the fit recovers their law on P_pdg with that dense count
    rows = pd.concat([_rows(pred, none_law, "none"), _rows(pred, pdg_law, "pdg", dense=2)], ignore_index=True)
    pred.fit_generation(rows)
    fit = pred.generation.fit_for("pdg")
    assert pred.generation.pdg_dense == 2 and fit.method == "linear"
    assert (fit.alpha, fit.beta, fit.gamma) == pytest.approx(pdg_law, rel=1e-6)
    mixed = pd.concat([rows, _rows(pred, pdg_law, "pdg", dense=1)], ignore_index=True)
    with pytest.raises(DitnasError, match=r"dense-only nets with \[1, 2\] dense slots"):
        pred.fit_generation(mixed)


SMALL = SearchSpace(depth=4, ops=("sa", "lcha"), widths=(0.5, 1.0), mlp_ratios=(2.0,), skippable=(1,),
                    stage_pattern=(0, 0, 0, 0), latent=(1, 1, 8, 8))


@torch.no_grad()
def test_the_profiled_pdg_denoiser_is_the_sampler_ditnas_sample_runs():
    from ditnas.latency_models.generation import DenoiserProgram, run_generation
    from ditnas.supernet.flow import euler_sample
    from ditnas.supernet.model import ElasticDiT
    from ditnas.supernet.token_drop import dense_only_fn

    torch.manual_seed(0)
    model = ElasticDiT(SMALL, ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1))
    for p in model.parameters():  # leave adaLN-Zero's identity blocks, or every branch is the same
        p.add_(torch.randn_like(p) * 0.05)
    sub = model.extract(SMALL.parse("sa:1:2 lcha:0.5:2 sa:1:2 lcha:1:2")).eval()
    x, y = torch.randn(2, 1, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    pdg = DenoiserProgram(sub, 2.0, guidance="pdg", pdg_dense=1)
    got = run_generation(pdg, x, y, 3, 2.0)
    want = euler_sample(lambda a, t, b: sub(a, t, b), y, (1, 1, 8, 8), steps=3, cfg_scale=2.0, null_label=sub.arch.num_classes,
                        generator=torch.Generator(), noise=x, guidance="pdg", uncond_fn=dense_only_fn(sub, 1))
    assert (got - want).abs().max().item() <= 1e-6
    cfg = run_generation(DenoiserProgram(sub, 2.0), x, y, 3, 2.0)
    assert (cfg - got).abs().max().item() > 1e-3  # the unconditional branch really is the dense-only net
    assert pdg.describe()["guidance"] == "pdg" and pdg.describe()["pdg_dense"] == 1
    with pytest.raises(DitnasError, match="leave no middle slot"):
        DenoiserProgram(sub, 2.0, guidance="pdg", pdg_dense=2)


def test_a_host_profile_times_pdg_generations_and_the_table_fits_them(tmp_path):
    from ditnas.config import LatencyConfig, load_config
    from ditnas.latency_models.generation_profile import read_generation_samples
    from ditnas.latency_models.profile import profile_space, supernet_for_profiling
    from ditnas.latency_models.stage import build_table

    sets = ["model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1", "space.depth=4",
            "space.stage_pattern=[0,0,0,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]", "space.mlp_ratios=[2]",
            "space.ops=[sa,lcha]"]
    supernet = supernet_for_profiling(load_config(None, sets))
    lat = LatencyConfig(backend="host-torch", warmup=1, iters=3, models=4, guidance=("none", "pdg"),
                        generation_steps=(2, 6), generation_iters=2)
    session = profile_space(supernet, lat, tmp_path)
    samples = read_generation_samples(session.root)
    pdg = samples[samples["guidance"] == "pdg"]
    assert len(pdg["key"].unique()) == 4 * 2 and all(":pdg-dense1:" in k for k in pdg["key"])
    _, pred = build_table(session, supernet)
    fit = pred.generation.fit_for("pdg")
    assert fit.method in ("linear", "ratio_median") and fit.n == 8 and pred.generation.pdg_dense == 1


@pytest.mark.slow  # lowers one denoiser (~1 min)
def test_an_exported_pdg_sampler_generates_what_the_pdg_sampler_does(tmp_path):
    """compress.export.guidance=pdg: the shipped .pte carries the dense-only unconditional branch (export's own
    parity check passes against the eager PDG program) and generates what `ditnas sample --guidance pdg` does."""
    from ditnas.compress.export import export_subnet, generate_from_pte
    from ditnas.config import ExportConfig, RunConfig
    from ditnas.io import atomic_torch_save
    from ditnas.supernet.extract import load_subnet
    from ditnas.supernet.flow import euler_sample
    from ditnas.supernet.model import ElasticDiT
    from ditnas.supernet.token_drop import dense_only_fn

    cfg_model = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)
    torch.manual_seed(0)
    net = ElasticDiT(SMALL, cfg_model).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sub = net.extract(SMALL.parse("lcha:1:2 sa:1:2 lcha:0.5:2 sa:1:2"))
    folder = tmp_path / "subnet"
    atomic_torch_save(folder / "subnet.pt", {"arch": str(sub.arch), "config": RunConfig(model=cfg_model).to_dict(),
                                             "space": SMALL.to_dict(), "weights": sub.state_dict()})
    cfg = ExportConfig(steps=3, cfg_scale=2.0, guidance="pdg", sampler="host-loop")
    manifest = export_subnet(cfg, folder, tmp_path / "out", name="pdg", measure=False)
    assert manifest["generation"]["guidance"] == "pdg" and manifest["generation"]["pdg_dense"] == 1
    images, _ = generate_from_pte(tmp_path / "out" / manifest["artifact"], label=4, n=2, seed=11)
    sub = load_subnet(folder)
    kw = dict(steps=3, cfg_scale=2.0, null_label=sub.arch.num_classes, generator=torch.Generator().manual_seed(11))
    want = euler_sample(sub, torch.full((2,), 4), sub.arch.latent, guidance="pdg", uncond_fn=dense_only_fn(sub, 1), **kw)
    cfg_images = euler_sample(sub, torch.full((2,), 4), sub.arch.latent, **{**kw, "generator": torch.Generator().manual_seed(11)})
    err = float((images - want).abs().max())
    assert err / float(want.abs().max()) <= 1e-3
    assert float((images - cfg_images).abs().max()) > 100 * err  # not the CFG sampler
    with pytest.raises(DitnasError, match="compress.export.pdg_dense: 2 dense slots"):
        export_subnet(replace(cfg, pdg_dense=2), folder, tmp_path / "bad", measure=False)
