"""Running the `albef` command in-process, for the CLI tests."""

import contextlib
import io

from transformers_albef import cli


def run_cli(*argv):
    """(exit status, stdout, stderr) of `albef ARGV`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as exit_info:  # argparse: --help, usage errors
            status = exit_info.code
    return status, out.getvalue(), err.getvalue()


def assert_user_error(result, *fragments):
    """Non-zero status, one `albef ...: error: ...` line on stderr that says why, no traceback."""
    status, _, err = result
    assert status not in (0, None)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
