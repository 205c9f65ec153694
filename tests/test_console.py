"""What a log shows: progress lines with an ETA when output is not a terminal; third-party
deprecation noise dropped, ditnas's own warnings and other categories kept."""

import io
import subprocess
import sys

from ditnas.console import LineProgress, progress_bar, quiet_third_party


def test_line_progress_prints_about_every_5_percent_with_eta():
    out = io.StringIO()
    with LineProgress(out, fraction=0.05, interval_s=1e9) as bar:
        task = bar.add_task("profile", total=None, phase="profile", info="")
        for i in range(1, 201):
            bar.update(task, completed=i, total=200, info=f"block:{i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 20  # one per 10 of 200 programs, the last one at 200/200
    assert lines[0].startswith("[profile] 10/200 (5%) elapsed ") and "ETA" in lines[0] and lines[0].endswith(": block:10")
    assert lines[-1].startswith("[profile] 200/200 (100%)") and "ETA" not in lines[-1]


def test_line_progress_prints_on_the_interval_and_at_exit():
    out = io.StringIO()
    with LineProgress(out, fraction=0.5, interval_s=0.0) as bar:
        task = bar.add_task("sweep", total=1000, phase="sweep", info="")
        bar.update(task, advance=1)
        bar.update(task, advance=1)
    assert [ln.split(" elapsed")[0] for ln in out.getvalue().splitlines()] == ["[sweep] 1/1000 (0%)", "[sweep] 2/1000 (0%)"]


def test_progress_bar_is_lines_on_a_pipe():
    stream = io.StringIO()  # not a terminal
    assert isinstance(progress_bar(True, stream), LineProgress)
    assert not isinstance(progress_bar(False, stream), LineProgress)


def test_third_party_deprecations_are_dropped_ours_kept():
    # in a fresh interpreter: pytest records warnings itself and would bypass the hook
    code = """
import warnings
import ditnas.console as console
console.quiet_third_party(); console.quiet_third_party()
warnings.simplefilter("always")
warnings.warn_explicit("LeafSpec is deprecated", FutureWarning, "/usr/lib/python3.11/copyreg.py", 105)
warnings.warn_explicit("ours is deprecated", FutureWarning, console.__file__, 1)
warnings.warn_explicit("a real problem", UserWarning, "/site-packages/torch/x.py", 3)
warnings.warn_explicit("Output Buffer not found.", UserWarning, "/site-packages/executorch/devtools/inspector/_inspector.py", 9)
warnings.warn_explicit("Unsupported kwarg encountered: a", UserWarning, "/site-packages/executorch/devtools/debug_format/et_schema.py", 9)
warnings.warn_explicit("a real executorch problem", UserWarning, "/site-packages/executorch/exir/x.py", 3)
"""
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "LeafSpec" not in err
    assert "ours is deprecated" in err and "a real problem" in err and "a real executorch problem" in err
    assert "Output Buffer" not in err and "Unsupported kwarg" not in err
