"""cli.errors, the command line's one error boundary: every error a command raises becomes one
'error: ...' line on stderr and status 2; no other module of cli/ reports an error itself."""

import ast
import errno
from pathlib import Path

import pytest

from cnpose_trt.cli import errors
from cnpose_trt.errors import CnposeError

CLI = Path(errors.__file__).parent


def _raise(exc: BaseException):
    def command() -> int:
        raise exc
    return command


@pytest.mark.parametrize("exc, line", [
    (ValueError("--bbox #2: empty"), "error: --bbox #2: empty"),
    (TypeError("bad type"), "error: bad type"),
    (CnposeError("a failed step"), "error: a failed step"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.png"), "error: No such file or directory: /x/y.png"),
    (OSError("no file named"), "error: no file named"),
    (MemoryError(), "error: out of memory"),
])
def test_errors_become_one_line_and_status_2(capsys, exc, line):
    assert errors.run(_raise(exc)) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_a_command_keeps_its_own_status(capsys):
    assert errors.run(lambda: 1) == 1 and errors.run(lambda a: a, 0) == 0
    assert capsys.readouterr().err == ""


def test_other_exceptions_are_not_swallowed():
    with pytest.raises(KeyError):
        errors.reported(_raise(KeyError("a bug")))


def test_the_boundary_is_the_only_place_that_reports_errors():
    """No other module of cli/ prints an 'error: ...' line or catches an error to return a status."""
    found = []
    for path in sorted(CLI.glob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("error: "):
                found.append(f"{path.name}:{node.lineno} prints {node.value!r}")
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                    and str(node.values[0].value).startswith("error: "):
                found.append(f"{path.name}:{node.lineno} prints an f-string 'error: ...'")
            if isinstance(node, ast.ExceptHandler) and any(isinstance(n, ast.Return) for n in ast.walk(node)):
                found.append(f"{path.name}:{node.lineno} returns a status from an except clause")
    assert not found, "\n".join(found)
