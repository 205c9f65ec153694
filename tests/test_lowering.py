"""The one lowering recipe (latency_models/lowering.py): constant propagation keeps LCHA's convolutions
inside XNNPACK (and without it they fall to portable kernels), the sidecar ties a .pte to the recipe,
and an op no backend can lower is one DitnasError naming the op and the backend."""

from __future__ import annotations

import json

import pytest
import torch

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models.lowering import (
    RECIPE,
    check_recipe,
    lower,
    recipe_fingerprint,
    require_delegated,
    sidecar_path,
    write_pte,
)
from ditnas.latency_models.programs import build_program, cells_for_space
from ditnas.supernet.model import ElasticDiT

pytest.importorskip("executorch")

CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)
CONV = "aten_convolution_default"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    from ditnas.search.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def supernet() -> ElasticDiT:
    torch.manual_seed(0)
    space = SearchSpace(depth=1, ops=("lcha",), widths=(0.5, 1.0), mlp_ratios=(2.0,), stage_pattern=(0,))
    net = ElasticDiT(space, CFG).eval()
    with torch.no_grad():  # adaLN-Zero / zero-init final: perturb so the output is not zeros
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _inputs(space):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, *space.latent, generator=g), torch.tensor([0.37]), torch.tensor([3]))


@pytest.fixture(scope="module")
def lcha_block(supernet):
    cell = next(c for c in cells_for_space(supernet.space, kinds=("block",)) if c.op == "lcha" and c.width == 0.5)
    return build_program(supernet, cell)


@pytest.fixture(scope="module")
def lowered_block(lcha_block):
    """The LCHA block lowered with the recipe and without constant propagation."""
    return (lower(lcha_block.module, lcha_block.inputs, etrecord=False),
            lower(lcha_block.module, lcha_block.inputs, etrecord=False, constant_prop=False))


@pytest.fixture(scope="module")
def lowered_model(supernet):
    """A whole LCHA model (width 0.5: a sliced conv weight), lowered with the recipe."""
    arch = supernet.space.parse("lcha:0.5:2")
    sub = supernet.extract(arch)
    inputs = _inputs(supernet.space)
    return sub, inputs, lower(sub, inputs)


def test_recipe_keeps_lcha_block_convolutions_delegated(lowered_block) -> None:
    good, bad = lowered_block
    assert good.report["non_delegated_compute_ops"] == []
    assert good.report["delegated_share"] == 1.0 and good.report["delegated_subgraphs"] == 1
    require_delegated(good)
    # without constant propagation the per-tap conv weights are computed at run time: portable convs
    assert CONV in bad.report["non_delegated_compute_ops"]
    assert bad.report["by_op"][CONV]["non_delegated"] >= 3  # kt = 3 temporal taps
    assert bad.report["delegated_share"] < 1.0
    with pytest.raises(DitnasError, match=r"aten_convolution_default.*not delegated to backend xnnpack"):
        require_delegated(bad, "lcha block")


def test_recipe_keeps_a_whole_lcha_model_in_one_delegate(lowered_model) -> None:
    _, _, good = lowered_model
    assert good.report["non_delegated_compute_ops"] == [] and good.report["delegated_subgraphs"] == 1
    assert good.recipe["name"] == RECIPE.name == "ditnas-xnnpack-v1"


@pytest.mark.slow
def test_without_constant_prop_a_whole_lcha_model_splits(lowered_model) -> None:
    sub, inputs, _ = lowered_model
    bad = lower(sub, inputs, constant_prop=False, etrecord=False)
    assert CONV in bad.report["non_delegated_compute_ops"] and bad.report["delegated_subgraphs"] > 1
    assert bad.recipe["name"] == RECIPE.name + "-no-constprop"


def test_written_pte_matches_eager_and_passes_check_recipe(lowered_model, tmp_path) -> None:
    from executorch.runtime import Runtime

    sub, inputs, good = lowered_model
    pte = write_pte(good, tmp_path / "m.pte")
    side = check_recipe(pte)
    assert side["recipe"] == recipe_fingerprint("xnnpack")
    assert side["inputs"] == [{"shape": [1, 1, 1, 16, 16], "dtype": "float32"}, {"shape": [1], "dtype": "float32"},
                              {"shape": [1], "dtype": "int64"}]
    assert side["delegation"]["delegated_share"] == 1.0
    got = Runtime.get().load_program(pte).load_method("forward").execute(list(inputs))[0]
    with torch.no_grad():
        want = sub(*inputs)
    assert float(want.abs().max()) > 0.1  # a real, non-zero output
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))
    assert not list(tmp_path.glob("*.tmp"))


def test_check_recipe_refuses_a_pte_lowered_otherwise(lowered_model, lowered_block, tmp_path) -> None:
    _, _, good = lowered_model
    bad = lowered_block[1]
    foreign = tmp_path / "foreign.pte"
    foreign.write_bytes(good.buffer)  # the same bytes, but not written by write_pte
    with pytest.raises(DitnasError, match=r"foreign\.pte has no foreign\.pte\.recipe\.json.*lowered outside ditnas"):
        check_recipe(foreign)
    other = write_pte(bad, tmp_path / "noconst.pte")
    with pytest.raises(DitnasError, match=r"another recipe \(name 'ditnas-xnnpack-v1-no-constprop' != 'ditnas-xnnpack-v1'"):
        check_recipe(other)
    old = write_pte(good, tmp_path / "old.pte")
    side = json.loads(sidecar_path(old).read_text())
    side["recipe"]["executorch"] = "0.7.0"
    sidecar_path(old).write_text(json.dumps(side))
    with pytest.raises(DitnasError, match=r"other tool versions: executorch 0\.7\.0 \(now 1\.5\.1\)"):
        check_recipe(old)
    sidecar_path(old).write_text("{trunc")
    with pytest.raises(DitnasError, match="unreadable or truncated"):
        check_recipe(old)
    with pytest.raises(DitnasError, match="another recipe.*backend 'xnnpack' != 'coreml'"):
        check_recipe(write_pte(good, tmp_path / "x.pte"), backend="coreml")


class _Inverse(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.inv(x)


def test_an_op_the_backend_cannot_lower_is_named() -> None:
    x = torch.randn(4, 4) + 4 * torch.eye(4)
    with pytest.raises(DitnasError, match=r"^inv: backend xnnpack cannot lower aten\.linalg_inv_ex\.default \("):
        lower(_Inverse(), (x,), etrecord=False, what="inv")


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(DitnasError, match="unknown backend 'vulkan'"):
        lower(_Inverse(), (torch.eye(2),), backend="vulkan")


@pytest.mark.slow
def test_coreml_lowers_ahead_of_time_on_this_host(lcha_block, tmp_path) -> None:
    """The Core ML partitioner lowers on Linux (coremltools compiles the payload); running needs macOS."""
    pytest.importorskip("coremltools")
    from ditnas.latency_models.lowering import runtime_can_run

    lowered = lower(lcha_block.module, lcha_block.inputs, backend="coreml", etrecord=False)
    assert lowered.report["non_delegated_compute_ops"] == [] and lowered.report["delegated_subgraphs"] == 1
    pte = write_pte(lowered, tmp_path / "b_coreml.pte")
    assert check_recipe(pte)["recipe"]["name"] == "ditnas-coreml-v1"
    assert runtime_can_run("xnnpack")
    import platform

    if platform.system() != "Darwin":
        assert not runtime_can_run("coreml")


def test_profiling_reuses_only_ptes_of_this_recipe(lcha_block, lowered_block, tmp_path) -> None:
    """An interrupted profile reuses a lowered .pte only when its sidecar names this recipe and these
    tool versions; a .pte from before the sidecar (or another executorch) is lowered again."""
    from ditnas.latency_models.backends.executorch_xnnpack import (
        ExecuTorchXnnpackBackend,
        file_stem,
    )

    backend = ExecuTorchXnnpackBackend(parity_atol=None, etdump=False)
    stem = file_stem(lcha_block.key())
    pte = write_pte(lowered_block[0], tmp_path / f"{stem}.pte")
    (tmp_path / f"{stem}.etrecord").write_bytes(b"etrecord")
    (tmp_path / f"{stem}.delegation.json").write_text(json.dumps({"key": lcha_block.key(), **lowered_block[0].report}))
    assert backend.reuse(lcha_block, tmp_path) is not None
    side = json.loads(sidecar_path(pte).read_text())
    side["recipe"]["executorch"] = "0.7.0"
    sidecar_path(pte).write_text(json.dumps(side))
    assert backend.reuse(lcha_block, tmp_path) is None
    sidecar_path(pte).unlink()
    assert backend.reuse(lcha_block, tmp_path) is None
    write_pte(lowered_block[1], pte)  # the no-constprop program: another recipe
    assert backend.reuse(lcha_block, tmp_path) is None
