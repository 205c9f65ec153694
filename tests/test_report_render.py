"""The run report in a real headless Chromium (issue 12): every image decodes, the console stays clean,
the screenshot is a real PNG; without a browser the check says so and `ditnas report` still writes the
report. Pages are built from the report module's own helpers (no pipeline run: seconds, not minutes)."""

import os

import pytest
from cli_helpers import run
from PIL import Image

from ditnas.reports import render_check
from ditnas.reports.render_check import BrowserMissing, check_render, find_browser
from ditnas.reports.report import CSS, _fig_to_img, _table


@pytest.fixture
def browser():
    try:
        return find_browser()
    except BrowserMissing as exc:
        if os.environ.get("DITNAS_REQUIRE_BROWSER"):  # .ci/run sets it once chromium is installed
            pytest.fail(f"Chromium is installed (DITNAS_REQUIRE_BROWSER) but not found: {exc}")
        pytest.skip(f"no headless browser here: {exc}")


def _figure(kind):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2]) if kind == "line" else ax.bar([0, 1], [2, 1])
    return _fig_to_img(fig)


def _page(tmp_path, body, name="page.html", title="ditnas run"):
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style>"
                    f"</head><body>{body}</body></html>")
    return path


def test_a_report_page_renders_every_image_and_its_screenshot(tmp_path, browser):
    html = _page(tmp_path, "<h1>run</h1>" + _figure("line") + _table([{"stage": "train", "wall s": 1.5}])
                 + _figure("bar"))
    result = check_render(html, tmp_path / "shots" / "page.png", width=640, height=480)
    assert (result.images_total, result.images_loaded, result.broken_images) == (2, 2, ())
    assert result.console_errors == () and result.ok
    assert result.title == "ditnas run"
    assert result.screenshot == tmp_path / "shots" / "page.png"
    with Image.open(result.screenshot) as shot:
        assert shot.format == "PNG" and shot.size == (640, 480)
        shot.load()  # decodes the whole file: a truncated PNG fails here
        # not a blank page: the figures and text put more than one colour on it
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)  # None: more than that many
        assert colours is None or len(colours) > 1


def test_a_broken_image_is_named_and_a_full_page_screenshot_is_the_page_height(tmp_path, browser):
    bad = '<img src="data:image/png;base64,AAAA">'
    html = _page(tmp_path, _figure("line") + bad + "<div style='height:3000px'></div>")
    result = check_render(html, tmp_path / "full.png", width=800)
    assert (result.images_total, result.images_loaded) == (2, 1)
    assert result.broken_images == ("data:image/png;base64,AAAA",) and not result.ok
    with Image.open(tmp_path / "full.png") as shot:
        assert shot.size[0] == 800 and shot.size[1] > 3000


def test_console_errors_and_uncaught_exceptions_are_reported(tmp_path, browser):
    html = _page(tmp_path, _figure("bar") + "<script>console.error('figure x missing')</script>"
                 "<script>throw new Error('boom in the report')</script>")
    result = check_render(html)
    assert result.images_loaded == result.images_total == 1 and result.screenshot is None
    assert len(result.console_errors) >= 2, result.console_errors
    assert any("figure x missing" in e for e in result.console_errors)
    assert any("boom in the report" in e for e in result.console_errors)
    assert not result.ok


def test_a_missing_browser_raises_browser_missing_with_the_install_command(tmp_path, monkeypatch):
    html = _page(tmp_path, "<p>x</p>")
    monkeypatch.setenv("DITNAS_CHROMIUM", str(tmp_path / "no-such-chromium"))
    install = "apt-get install chromium chromium-driver"
    with pytest.raises(BrowserMissing, match=f"DITNAS_CHROMIUM=.*no-such-chromium.*{install}"):
        check_render(html)
    monkeypatch.delenv("DITNAS_CHROMIUM")
    monkeypatch.delenv("DITNAS_CHROMEDRIVER", raising=False)
    monkeypatch.setattr(render_check.shutil, "which", lambda name: None)
    with pytest.raises(BrowserMissing, match=f"no Chromium browser found on PATH.*{install}"):
        check_render(html)
    # only the driver missing: the message names the driver
    monkeypatch.setattr(render_check.shutil, "which", lambda name: "/bin/sh" if name == "chromium" else None)
    with pytest.raises(BrowserMissing, match="no chromedriver found"):
        check_render(html)


def _run_folder(tmp_path):
    """The least `write_report` accepts: a run.json whose stages have not run (every section says so)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"stages": {}}')
    return run_dir


def test_report_cli_skips_the_check_without_a_browser_and_still_writes_the_report(tmp_path, monkeypatch, capsys):
    run_dir = _run_folder(tmp_path)
    monkeypatch.setenv("DITNAS_CHROMIUM", str(tmp_path / "no-such-chromium"))
    code, out, err = run(["report", str(run_dir), "--check"], capsys)
    assert code == 0, err
    assert (run_dir / "report.html").is_file()
    skipped = [line for line in out.splitlines() if line.startswith("render check skipped: ")]
    assert len(skipped) == 1 and "apt-get install chromium chromium-driver" in skipped[0]
    assert not (run_dir / "report_screenshot.png").exists()
    code, out, _ = run(["report", str(run_dir), "--no-check"], capsys)  # no check asked: no line about it
    assert code == 0 and "render check" not in out


def test_report_cli_checks_the_written_report_and_fails_on_a_broken_one(tmp_path, browser, monkeypatch, capsys):
    run_dir = _run_folder(tmp_path)
    code, out, err = run(["report", str(run_dir)], capsys)  # the check is the default
    assert code == 0, err
    assert "render check: 0/0 images loaded, 0 console error(s), screenshot" in out
    assert (run_dir / "report_screenshot.png").is_file()

    from ditnas.reports import report

    def broken_report(run_dir):
        return _page(run_dir, _figure("line") + '<img src="data:image/png;base64,AAAA">', name="report.html")

    monkeypatch.setattr(report, "write_report", broken_report)
    code, out, err = run(["report", str(run_dir)], capsys)
    assert code == 2
    assert "render check: 1/2 images loaded" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not render cleanly: 1 broken image(s)" in lines[0] and "report.html" in lines[0]
