"""Run the CLI in-process and capture (exit code, stdout, stderr)."""

import pytest

from ditnas.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
