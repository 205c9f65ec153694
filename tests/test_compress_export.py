"""compress/export.py: the shipped .pte of a subnet, lowered by the profiling recipe, checked against
eager on real trajectories, with delegation, ETDump op breakdown and timings in its manifest;
generate_from_pte reproduces the eager sampler; tanh-GELU parity on XNNPACK.

One tiny real SubDiT (random non-zero weights: adaLN-Zero and the zero-init final layer make a fresh
model output zeros) is exported once per module and shared."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ditnas.arch import SearchSpace
from ditnas.compress.export import artifact_name, export_subnet, generate_from_pte
from ditnas.manifest import read_manifest
from ditnas.config import ExportConfig, ModelConfig, RunConfig
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.io import atomic_torch_save
from ditnas.latency_models.lowering import check_recipe, lower, sidecar_path, write_pte
from ditnas.supernet.extract import load_subnet
from ditnas.supernet.flow import euler_sample
from ditnas.supernet.model import ElasticDiT

pytest.importorskip("executorch")

CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)
SPACE = SearchSpace(depth=1, ops=("lcha", "sa"), widths=(0.5, 1.0), mlp_ratios=(2.0,), stage_pattern=(0,))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    from ditnas.search.threads import torch_threads

    with torch_threads(1):
        yield


def make_subnet(folder, arch_text: str, seed: int = 0):
    """A subnet folder as `ditnas extract` writes it (subnet.pt), from a perturbed fresh supernet."""
    torch.manual_seed(seed)
    net = ElasticDiT(SPACE, CFG).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sub = net.extract(SPACE.parse(arch_text))
    atomic_torch_save(folder / "subnet.pt", {"arch": str(sub.arch), "config": RunConfig(model=CFG).to_dict(),
                                             "space": SPACE.to_dict(), "weights": sub.state_dict()})
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    subnet = make_subnet(root / "subnet", "lcha:1:2")
    cfg = ExportConfig(steps=4, cfg_scale=2.0, timing_iters=10)
    import ditnas.compress.export as export_module

    seen = []
    real = export_module.lower
    with pytest.MonkeyPatch.context() as mp:  # keep the lowered program, so other tests need not lower again
        mp.setattr(export_module, "lower", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
        manifest = export_subnet(cfg, subnet, root / "out", name="tiny")
    return cfg, subnet, root / "out", manifest, seen[0]


def test_export_writes_a_checked_pte_and_manifest(exported) -> None:
    cfg, subnet, out, manifest, _ = exported
    pte = out / "tiny_xnnpack_fp32.pte"
    unrolled = out / "tiny-unrolled4_xnnpack_fp32.pte"
    assert pte.name == artifact_name("tiny", "xnnpack", "fp32")
    assert read_manifest(out, "ditnas.export") == manifest
    assert set(manifest["files"]) == {pte.name, sidecar_path(pte).name, "tiny_xnnpack_fp32.etrecord", "tiny_xnnpack_fp32.etdp",
                                      unrolled.name, sidecar_path(unrolled).name}
    # sampler "fastest": both programs timed, the faster one is the artifact, the other its alternative
    choice = manifest["metrics"]["sampler"]
    assert choice["host_loop_ms"] > 0 and choice["unrolled_ms"] > 0 and choice["samples"] == 2 * cfg.timing_iters
    faster = unrolled if choice["unrolled_ms"] < choice["host_loop_ms"] else pte
    assert manifest["artifact"] == faster.name and manifest["alternative"] == ({pte, unrolled} - {faster}).pop().name
    assert choice["shipped"] == ("unrolled" if faster == unrolled else "host-loop") and "faster" in choice["why"]
    assert manifest["generation"]["kind"] == ("unrolled" if faster == unrolled else "denoiser")
    u = manifest["metrics"]["unrolled"]
    assert u["delegated_share"] == 1.0 and 0 < u["parity"]["generation_rel_error"] <= cfg.parity_rtol
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging / tmp file left
    side = check_recipe(pte)
    assert side["recipe"] == manifest["recipe"] and manifest["recipe"]["name"] == "ditnas-xnnpack-v1"
    assert side["inputs"][0]["shape"] == [1, *load_subnet(subnet).arch.latent]
    m = manifest["metrics"]
    assert m["parity"]["checked"] and m["parity"]["max_step_rel_error"] <= cfg.parity_rtol
    assert 0 < m["parity"]["generation_rel_error"] <= cfg.parity_rtol
    assert m["delegated_share"] == 1.0 and m["delegation"]["non_delegated_compute_ops"] == []
    ops = m["ops"]
    assert ops and any(r["event"] == "Method::execute" for r in ops) and any(r["delegated"] for r in ops)
    t = m["timing"]
    assert t["pte_generation_ms"] > t["pte_call_ms"] > 0 and t["eager_generation_ms"] > t["eager_call_ms"] > 0
    assert t["pte_speedup_vs_eager"] == pytest.approx(t["eager_generation_ms"] / t["pte_generation_ms"])
    assert manifest["generation"]["cfg_scale"] == 2.0 and manifest["generation"]["steps"] == 4
    assert manifest["arch"] == "[patch=2 latent=1x1x16x16 classes=10 steps=28] lcha:1:2"


def test_host_loop_sampler_exports_no_unrolled_program(exported, tmp_path, monkeypatch) -> None:
    import ditnas.compress.export as export_module

    cfg, subnet, _, _, lowered = exported
    calls = []
    monkeypatch.setattr(export_module, "lower", lambda *a, **k: calls.append(a[0]) or lowered)
    m = export_subnet(replace(cfg, sampler="host-loop"), subnet, tmp_path / "h", name="tiny", measure=False)
    assert m["artifact"] == "tiny_xnnpack_fp32.pte" and m["alternative"] is None and len(calls) == 1
    assert m["metrics"]["sampler"] == {"shipped": "host-loop", "why": "compress.export.sampler is host-loop"}
    assert not (tmp_path / "h" / "tiny-unrolled4_xnnpack_fp32.pte").exists()
    long = export_subnet(replace(cfg, steps=28), subnet, tmp_path / "l", name="tiny", measure=False)
    assert long["metrics"]["sampler"]["shipped"] == "host-loop" and len(calls) == 2  # fastest, untimed: not unrolled


@pytest.mark.parametrize("program", ["tiny_xnnpack_fp32.pte", "tiny-unrolled4_xnnpack_fp32.pte"])
def test_generate_from_pte_equals_the_eager_sampler(exported, program) -> None:
    """The host-loop denoiser and the unrolled 4-step program both generate what the eager sampler does."""
    cfg, subnet, out, _, _ = exported
    sub = load_subnet(subnet)
    images, timing = generate_from_pte(out / program, label=4, n=3, seed=11)
    want = euler_sample(sub, torch.full((3,), 4), sub.arch.latent, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                        null_label=10, generator=torch.Generator().manual_seed(11))
    assert images.shape == want.shape == (3, 1, 1, 16, 16)
    rel = float((images - want).abs().max()) / float(want.abs().max())
    assert rel <= 1e-3, rel
    assert len(timing["ms_per_image"]) == 3 and timing["steps"] == 4
    other = euler_sample(sub, torch.full((3,), 4), sub.arch.latent, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                         null_label=10, generator=torch.Generator().manual_seed(12))
    assert float((images - other).abs().max()) > 100 * float((images - want).abs().max())  # seed matters
    if "unrolled" in program:  # its steps are baked in
        with pytest.raises(DitnasError, match="unrolled 4-step sampler and generates with 4 steps only, not 2"):
            generate_from_pte(out / program, label=4, n=1, steps=2)
        return
    two, _ = generate_from_pte(out / program, label=4, n=1, steps=2, seed=11)
    assert float((two - images[:1]).abs().max()) > 1e-2  # steps is honoured


def test_generate_from_pte_refuses_other_programs(exported, tmp_path) -> None:
    _, _, out, _, _ = exported
    pte = out / "tiny_xnnpack_fp32.pte"
    with pytest.raises(DitnasError, match="label 10 is outside 0..9"):
        generate_from_pte(pte, label=10, n=1)
    # a plain (non-export) ditnas program: recipe sidecar but no denoiser record
    plain = write_pte(lower(torch.nn.Linear(4, 4), (torch.randn(1, 4),), etrecord=False), tmp_path / "lin.pte")
    with pytest.raises(DitnasError, match="is not a ditnas export"):
        generate_from_pte(plain, label=1, n=1)
    # the sidecar of this export beside another model's .pte: the shapes give it away
    fake = tmp_path / "other_xnnpack_fp32.pte"
    fake.write_bytes(plain.read_bytes())
    sidecar_path(fake).write_text(sidecar_path(pte).read_text())
    with pytest.raises(DitnasError, match=r"takes inputs \[\[1, 4\]\].*another model's"):
        generate_from_pte(fake, label=1, n=1)
    # a .pte changed after export: the manifest's sha256 refuses it
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / pte.name).read_bytes())
    data[-100] ^= 0xFF
    (copy / pte.name).write_bytes(bytes(data))
    with pytest.raises(DitnasError, match="does not match the sha256"):
        generate_from_pte(copy / pte.name, label=1, n=1)
    with pytest.raises(DitnasError, match="lowered outside ditnas"):
        (tmp_path / "bare.pte").write_bytes(pte.read_bytes())
        generate_from_pte(tmp_path / "bare.pte", label=1, n=1)


def test_failed_parity_leaves_nothing_under_the_final_name(exported, tmp_path, monkeypatch) -> None:
    import ditnas.compress.export as export_module

    cfg, subnet, _, _, lowered = exported
    monkeypatch.setattr(export_module, "lower", lambda *a, **k: lowered)  # the same program, not lowered again
    out = tmp_path / "strict"
    with pytest.raises(DitnasError, match=r"differs from eager by .* > compress\.export\.parity_rtol 1e-12; nothing was written"):
        export_subnet(replace(cfg, parity_rtol=1e-12), subnet, out, name="tiny", measure=False)
    assert [p.name for p in out.iterdir()] == []


def test_export_config_is_checked(exported, tmp_path) -> None:
    _, subnet, _, _, _ = exported
    with pytest.raises(ConfigFieldError, match="compress.export.dtype: fp16 is not offered for backend xnnpack"):
        export_subnet(ExportConfig(dtype="fp16"), subnet, tmp_path)
    with pytest.raises(ConfigFieldError, match="compress.export.time_shift"):
        ExportConfig(time_shift=0.0).check()
    with pytest.raises(ConfigFieldError, match="compress.export.sampler: unknown 'loop'; choose one of host-loop, unrolled, fastest"):
        ExportConfig(sampler="loop").check()
    with pytest.raises(ConfigFieldError, match="compress.export.sampler: an unrolled sampler is exported as a .pte only"):
        ExportConfig(backend="mlpackage", dtype="fp16", sampler="unrolled").check()
    with pytest.raises(DitnasError, match="name 'a/b'"):
        export_subnet(ExportConfig(), subnet, tmp_path, name="a/b")


def test_tanh_gelu_block_parity_on_xnnpack(tmp_path) -> None:
    """compress-export-notes.md: executorch 1.5.1's XNNPACK runs exact GELU for approximate='tanh'.
    Measure which GELU the runtime computes and that the gap stays inside the export parity budget."""
    from executorch.runtime import Runtime

    class Gelu(torch.nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="tanh")

    x = torch.linspace(-4, 4, 4096).reshape(1, 4096)
    pte = write_pte(lower(Gelu(), (x,), etrecord=False), tmp_path / "gelu.pte")
    got = Runtime.get().load_program(pte).load_method("forward").execute([x])[0]
    vs_tanh = float((got - F.gelu(x, approximate="tanh")).abs().max())
    vs_exact = float((got - F.gelu(x)).abs().max())
    gap = float((F.gelu(x, approximate="tanh") - F.gelu(x)).abs().max())
    assert gap > 1e-4  # the two GELUs really differ on [-4, 4]
    # whichever it runs, it is one of the two (not something else), and within the 1e-3 budget
    assert min(vs_tanh, vs_exact) <= 1e-5, (vs_tanh, vs_exact)
    assert vs_tanh <= ExportConfig().parity_rtol
    print(f"xnnpack tanh-GELU: max |pte - tanh| {vs_tanh:.2e}, |pte - exact| {vs_exact:.2e}")


@pytest.mark.slow
def test_mlpackage_and_coreml_pte_convert_but_say_they_cannot_run_here(exported, tmp_path) -> None:
    pytest.importorskip("coremltools")
    import platform

    _, subnet, _, _, _ = exported
    m = export_subnet(ExportConfig(backend="mlpackage", dtype="fp16"), subnet, tmp_path / "ml", name="tiny")
    assert (tmp_path / "ml" / "tiny_coreml_fp16.mlpackage").is_dir()
    c = export_subnet(ExportConfig(backend="coreml", dtype="fp16"), subnet, tmp_path / "c", name="tiny")
    assert (tmp_path / "c" / "tiny_coreml_fp16.pte").is_file()
    assert c["recipe"]["name"] == "ditnas-coreml-v1" and c["metrics"]["delegated_share"] == 1.0
    if platform.system() != "Darwin":
        for man in (m, c):
            assert man["metrics"]["parity"]["checked"] is False and "cannot run on this host" in man["metrics"]["parity"]["reason"]
    assert json.loads((tmp_path / "ml" / "tiny_coreml_fp16.mlpackage.json").read_text())["generation"]["steps"] == 4
