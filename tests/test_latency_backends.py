"""ExecuTorch + XNNPACK backend: lowering, delegation report, .pte parity, timing, ETDump round trip.

Each lowering takes seconds on this machine, so the 8 block programs are lowered once per module
(plus one small transition program in the session test): 9 lowerings in all.
"""

from __future__ import annotations

import json

import pytest
import torch

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models import (
    ProfilingSession,
    build_program,
    cells_for_space,
    get_backend,
    programs_for_cells,
)
from ditnas.latency_models.backends.base import Prepared
from ditnas.latency_models.backends.executorch_xnnpack import COMPUTE_OPS, parse_etdump
from ditnas.supernet.model import ElasticDiT

pytest.importorskip("executorch")

OPS = ("sa", "assa", "lcha", "ssa")
CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)


@pytest.fixture(scope="module")
def supernet() -> ElasticDiT:
    torch.manual_seed(0)
    space = SearchSpace(depth=1, ops=OPS, widths=(0.5, 1.0), mlp_ratios=(2.0,), stage_pattern=(0,))
    net = ElasticDiT(space, CFG).eval()
    with torch.no_grad():  # non-zero adaLN gates, so parity sees the mixer
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def lowered(supernet: ElasticDiT, tmp_path_factory):
    """All 8 block programs (4 ops x widths 0.5, 1) lowered strictly: compute ops must be delegated."""
    cells = cells_for_space(supernet.space, kinds=("block",))
    assert sorted((c.op, c.width) for c in cells) == sorted((op, w) for op in OPS for w in (0.5, 1.0))
    backend = get_backend("executorch-xnnpack", strict=True, parity_atol=1e-4)
    workdir = tmp_path_factory.mktemp("pte")
    prepared = backend.prepare(programs_for_cells(supernet, cells), workdir)
    return backend, {p.key(): p for p in prepared}, workdir


def _sa(lowered, width: str = "1"):
    return lowered[1][f"block:sa:w{width}:r2:n64:s0"]


def test_pte_matches_eager_for_every_op_and_width(lowered) -> None:
    backend, prepared, workdir = lowered
    assert len(prepared) == 8
    for key, item in prepared.items():
        # 1e-4 absolute on unit-scale outputs, relative above (block outputs here are ~4)
        scale = float(item.program.eager().abs().max())
        assert 1.0 < scale < 10.0
        assert item.report["parity_max_abs_err"] <= 1e-4 * scale, key
        # recompute independently of prepare: fresh load, same inputs
        got = backend.run_once(item)[0]
        assert float((got - item.program.eager()).abs().max()) <= 1e-4 * scale, key
        for kind in ("pte", "etrecord"):
            assert item.artifacts[kind].is_file() and item.artifacts[kind].stat().st_size > 0
        assert item.artifacts["pte"].read_bytes()[4:8] == b"ET12"
        report = json.loads((workdir / (item.artifacts["pte"].stem + ".delegation.json")).read_text())
        assert report["key"] == key and report["compute_delegated"] == report["compute_nodes"] > 0


def test_sa_block_lowers_whole_to_xnnpack(lowered) -> None:
    report = _sa(lowered).report
    assert not [op for op in report["non_delegated_ops"] if COMPUTE_OPS.match(op)]
    for forbidden in ("mm", "bmm", "linear", "softmax"):
        assert not [op for op in report["non_delegated_ops"] if forbidden in op], report["non_delegated_ops"]
    delegated = {op for op, b in report["by_op"].items() if b["delegated"]}
    assert {"aten_linear_default", "aten_bmm_default", "aten__softmax_default"} <= delegated
    assert report["delegated_share"] == 1.0
    # the block is one delegate call; what is left outside are dtype/dim-order copies of constants
    assert report["delegated_subgraphs"] == 1
    assert report["delegated_nodes"] > 10 * report["non_delegated_nodes"]


def test_measure_times_each_execute_and_writes_an_etdump(lowered) -> None:
    backend = lowered[0]
    item = _sa(lowered, "0.5")
    rows = backend.measure([item], warmup=2, iters=5)
    assert [r["iteration"] for r in rows] == list(range(5))
    assert all(r["key"] == item.key() and r["latency_ms"] > 0 for r in rows)
    etdp = item.artifacts["etdump"]
    assert etdp.read_bytes()[8:12] == b"ED00"
    events = backend.parse(etdp)
    executed = [e for e in events if e["event_block"] == "Execute"]
    assert executed, "ETDump read back with no execution events"
    assert {e["run"] for e in executed} == set(range(backend.etdump_runs))
    assert any(e["delegated"] and e["delegate_backend"] == "XnnpackBackend" for e in executed)
    assert all(e["latency_ms"] >= 0 for e in events)
    assert backend.info()["tool_versions"]["executorch"] and backend.info()["threads"] == 1


def test_bad_etdumps_are_clear_errors(lowered, tmp_path) -> None:
    backend, _, _ = lowered
    item = _sa(lowered)
    # a dump written before the method ever ran: load events only, nothing executed
    program = backend.load(item.artifacts["pte"], etdump=True)
    program.load_method("forward")
    empty = tmp_path / "empty.etdp"
    program.write_etdump_result_to_file(str(empty), str(tmp_path / "empty_debug.bin"))
    with pytest.raises(DitnasError, match="no execution events"):
        parse_etdump(empty)
    with pytest.raises(DitnasError, match="not an ETDump"):
        parse_etdump(item.artifacts["pte"])
    (tmp_path / "cut.etdp").write_bytes(b"\x00" * 8 + b"ED00" + b"\x01\x02")
    with pytest.raises(DitnasError, match="unreadable"):
        parse_etdump(tmp_path / "cut.etdp")
    with pytest.raises(DitnasError, match="does not exist"):
        parse_etdump(tmp_path / "missing.etdp")


def test_graph_xnnpack_cannot_load_is_a_clear_error(tmp_path) -> None:
    """A 7-D permute (how patchify was first written) passes the partitioner but fails in the runtime."""
    from ditnas.latency_models.programs import Cell, Program

    prog = Program(Cell("patch_embed", tokens=16), _SevenD().eval(), (torch.randn(1, 1, 1, 8, 8),))
    with pytest.raises(DitnasError, match="cannot load .*more than 6 dims"):
        get_backend("executorch-xnnpack").prepare([prog], tmp_path)


def test_an_interrupted_profile_reuses_what_was_lowered(lowered, supernet: ElasticDiT, tmp_path) -> None:
    backend, _, workdir = lowered
    item = _sa(lowered)
    pte = item.artifacts["pte"]
    stamp = pte.stat().st_mtime_ns
    again = backend.reuse(item.program, workdir)
    assert again is not None and again.artifacts["pte"] == pte and again.report == json.loads(
        (workdir / f"{pte.stem}.delegation.json").read_text())
    assert pte.stat().st_mtime_ns == stamp  # not lowered again
    assert backend.reuse(item.program, tmp_path) is None  # nothing built there yet
    (tmp_path / pte.name).write_bytes(pte.read_bytes())  # a .pte without its report: lowering was cut short
    assert backend.reuse(item.program, tmp_path) is None


class _SevenD(torch.nn.Module):
    """Module level, so a spawned lowering worker can unpickle it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = (x * 2.0).reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1)
        return x.reshape(b, t * (h // 2) * (w // 2), 4 * c)


def test_lowering_in_worker_processes_builds_the_same_programs(lowered, tmp_path, monkeypatch) -> None:
    """prepare_all with 2 spawned workers writes byte-identical .pte files and the same reports as
    lowering in this process, in the order given; a second call reuses all; a worker's failure is
    the same clear error as in-process."""
    from ditnas.latency_models import prepare_pool
    from ditnas.latency_models.prepare_pool import prepare_all
    from ditnas.latency_models.programs import Cell, Program

    backend, serial, serial_dir = lowered
    monkeypatch.setattr(prepare_pool, "MIN_PROGRAMS_FOR_POOL", 1)  # a pool even for 2 programs (test time)
    programs = [item.program for item in serial.values()][:2]
    steps: list[tuple[int, int]] = []
    parallel = prepare_all(backend, programs, tmp_path, workers=2, progress=lambda i, n, key: steps.append((i, n)))
    assert steps == [(1, 2), (2, 2)]  # one line per finished program
    assert [p.key() for p in parallel] == [p.key() for p in programs]
    assert all(a.program is b for a, b in zip(parallel, programs, strict=True))  # the caller's programs
    for item in parallel:
        twin = serial[item.key()]
        assert item.artifacts["pte"].parent == tmp_path
        assert item.artifacts["pte"].read_bytes() == twin.artifacts["pte"].read_bytes()
        assert item.report["by_op"] == twin.report["by_op"]
        assert item.report["parity_max_abs_err"] == twin.report["parity_max_abs_err"]
    stamps = [p.artifacts["pte"].stat().st_mtime_ns for p in parallel]
    again = prepare_all(backend, programs, tmp_path, workers=2)
    assert [p.artifacts["pte"].stat().st_mtime_ns for p in again] == stamps  # reused, nothing lowered again
    bad = Program(Cell("patch_embed", tokens=16), _SevenD().eval(), (torch.randn(1, 1, 1, 8, 8),))
    with pytest.raises(DitnasError, match="cannot load .*more than 6 dims"):
        prepare_all(backend, [bad], tmp_path / "bad", workers=2)


def test_a_new_session_copies_lowered_programs_from_the_cache(lowered, supernet, tmp_path, monkeypatch) -> None:
    """Programs one session lowered are copied, not lowered again, into another session's folder;
    the key follows shapes (model dimensions), not weight values; a torn entry is a miss."""
    from ditnas.latency_models.lowered_cache import LoweredCache
    from ditnas.latency_models.prepare_pool import prepare_all

    backend, serial, serial_dir = lowered
    programs = [item.program for item in serial.values()][:2]
    cache = LoweredCache(tmp_path / "cache")
    for program in programs:
        cache.store(backend, program, serial_dir)
    calls: list = []
    real = backend.prepare
    monkeypatch.setattr(backend, "prepare", lambda progs, wd: calls.append(progs) or real(progs, wd))
    steps: list[str] = []
    copied = prepare_all(backend, programs, tmp_path / "b", cache=cache, progress=lambda i, n, key: steps.append(key))
    assert calls == [] and "2 from the cache" in steps[0]
    for item in copied:
        twin = serial[item.key()]
        assert item.artifacts["pte"].read_bytes() == twin.artifacts["pte"].read_bytes()
        report = item.artifacts["pte"].with_suffix(".delegation.json")
        assert report.read_bytes() == twin.artifacts["pte"].with_suffix(".delegation.json").read_bytes()
    cell = programs[0].cell
    torch.manual_seed(1)
    reseeded = ElasticDiT(supernet.space, CFG).eval()  # other weights, same shapes: same entry
    assert cache.key(backend, build_program(reseeded, cell)) == cache.key(backend, programs[0])
    wider = ElasticDiT(supernet.space, ModelConfig(max_heads=2, head_dim=8, cond_dim=32, cond_tokens=1)).eval()
    assert cache.key(backend, build_program(wider, cell)) != cache.key(backend, programs[0])
    entry = cache.root / "lowered" / cache.key(backend, programs[1])[:2] / cache.key(backend, programs[1])
    next(entry.glob("*.delegation.json")).unlink()  # a torn entry: the report is missing
    assert not cache.fetch(backend, programs[1], tmp_path / "c")
    assert not list((tmp_path / "c").glob("*")) if (tmp_path / "c").exists() else True


# Logs every ExecuTorch execute() as the file name of the .pte it runs. Installed in this process with
# monkeypatch.setattr, and in the fresh timing process as a sitecustomize on its PYTHONPATH.
_EXECUTE_LOGGER = """
from pathlib import Path


def install(log, setattr=setattr):
    from executorch.runtime import Method, Program, Runtime

    load_program, load_method, execute = Runtime.load_program, Program.load_method, Method.execute

    def logged_load_program(self, data, *args, **kwargs):
        program = load_program(self, data, *args, **kwargs)
        program._logged_source = Path(data).name
        return program

    def logged_load_method(self, name):
        method = load_method(self, name)
        method._logged_source = self._logged_source
        return method

    def logged_execute(self, inputs):
        with open(log, "a") as f:
            f.write(self._logged_source + "\\n")
        return execute(self, inputs)

    setattr(Runtime, "load_program", logged_load_program)
    setattr(Program, "load_method", logged_load_method)
    setattr(Method, "execute", logged_execute)
"""


def test_measure_interleaves_programs_on_xnnpack(lowered, tmp_path, monkeypatch) -> None:
    """Every ExecuTorch execute() is logged, in the fresh timing process and in this one: after the
    warm-up, each round runs every program once, in an order that changes between rounds."""
    prepared = lowered[1]
    items = [prepared[k] for k in ("block:sa:w0.5:r2:n64:s0", "block:sa:w1:r2:n64:s0", "block:lcha:w0.5:r2:n64:s0")]
    by_file = {i.artifacts["pte"].name: i.key() for i in items}
    warmup, iters, n = 1, 7, len(items)
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(
        _EXECUTE_LOGGER + "\nimport os\nif os.environ.get('DITNAS_TEST_EXECUTE_LOG'):\n"
        "    install(os.environ['DITNAS_TEST_EXECUTE_LOG'])\n"
    )
    orders = {}
    for isolate in (True, False):  # in a fresh interpreter (the default) and in this process
        log = tmp_path / f"executed-{isolate}.txt"
        if isolate:
            monkeypatch.setenv("PYTHONPATH", str(hook_dir))
            monkeypatch.setenv("DITNAS_TEST_EXECUTE_LOG", str(log))
        else:
            namespace: dict = {}
            exec(_EXECUTE_LOGGER, namespace)  # noqa: S102 -- the logger above, installed here
            namespace["install"](log, setattr=monkeypatch.setattr)
        backend = get_backend("executorch-xnnpack", isolate=isolate, etdump=False)
        rows = backend.measure(items, warmup=warmup, iters=iters)
        assert sorted({r["key"] for r in rows}) == sorted(i.key() for i in items)
        assert all(sorted(r["iteration"] for r in rows if r["key"] == i.key()) == list(range(iters)) for i in items)
        assert all(r["latency_ms"] > 0 for r in rows)
        executed = [by_file[name] for name in log.read_text().split()]
        assert len(executed) == n * (warmup + iters), isolate
        timed = executed[n * warmup:]
        rounds = [tuple(timed[i:i + n]) for i in range(0, len(timed), n)]
        assert all(sorted(r) == sorted(by_file.values()) for r in rounds), (isolate, rounds)
        assert len(set(rounds)) > 1, (isolate, rounds)  # shuffled afresh, not one fixed order
        orders[isolate] = rounds
    assert orders[True] == orders[False]  # the same seeded visiting order in and out of process


def test_a_damaged_pte_fails_the_timing_process_with_a_clear_error(lowered, tmp_path) -> None:
    item = _sa(lowered, "0.5")
    bad = tmp_path / item.artifacts["pte"].name
    bad.write_bytes(item.artifacts["pte"].read_bytes()[:200])  # cut short, as by a full disk
    damaged = Prepared(item.program, artifacts={"pte": bad})
    with pytest.raises(DitnasError, match=r"block:sa:w0.5.*not a loadable \.pte.*lowers it again"):
        get_backend("executorch-xnnpack", etdump=False).measure([damaged], warmup=0, iters=2)


def test_executorch_session_writes_artifacts(supernet: ElasticDiT, tmp_path) -> None:
    space = supernet.space
    backend = get_backend("executorch-xnnpack", etdump_runs=2)
    session = ProfilingSession.open(tmp_path / "s", backend, warmup=2, iters=5)
    prog = build_program(supernet, next(c for c in cells_for_space(space) if c.kind == "final" and c.width == 0.5))
    assert session.run([prog], backend) == [prog.key()]
    samples = session.samples()
    assert len(samples) == 5 and set(samples["backend"]) == {"executorch-xnnpack"}
    stems = {p.suffix for p in session.artifacts_dir.iterdir()}
    assert {".pte", ".etrecord", ".etdp", ".json"} <= stems
    assert session.manifest["device"]["tool_versions"]["executorch"]


def test_the_parity_check_refuses_a_pte_that_changed_the_function(supernet, tmp_path, monkeypatch) -> None:
    """The default tolerance (PARITY_ATOL x max(1, |out|)) passes XNNPACK's rounding -- up to 1.13e-4 relative on
    the half-width, MLP-ratio-4 blocks -- and refuses anything ~10x larger, naming the program and both numbers."""
    from ditnas.latency_models.backends.executorch_xnnpack import PARITY_ATOL, ExecuTorchXnnpackBackend

    cell = next(c for c in cells_for_space(supernet.space, kinds=("down", "up", "patch_embed", "final")))
    program = build_program(supernet, cell)
    backend = ExecuTorchXnnpackBackend(etdump=False)
    assert backend.parity_atol == PARITY_ATOL == 5e-4
    monkeypatch.setattr(backend, "parity", lambda item: (4 * 1.13e-4, 4.0))  # the measured worst rounding at |out| = 4
    assert backend.prepare([program], tmp_path)[0].report["parity_tolerance"] == pytest.approx(2e-3)
    monkeypatch.setattr(backend, "parity", lambda item: (4 * 1.2e-3, 4.0))
    with pytest.raises(DitnasError, match=rf"program {program.key()}: \.pte output differs from eager by 0\.0048 > 0\.002"):
        backend.prepare([program], tmp_path)
