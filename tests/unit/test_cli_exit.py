"""The entry points' start and exit: what runs before the flags are parsed, and what run_cli leaves for the shutdown."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from killed_worker import loader_whose_worker_dies

from detector.cli.common import run_cli


def test_run_cli_freezes_the_objects_left_at_exit_and_output_still_arrives() -> None:
    """The shutdown's garbage collections skip what exists at exit (gc.freeze, registered by run_cli); atexit
    handlers registered before it still run afterwards, and a file written by the command is complete."""
    script = textwrap.dedent(
        """
        import atexit, gc, sys
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
        from detector.cli.common import run_cli

        def command():
            print("frozen during the command:", gc.get_freeze_count() > 0)
            sys.stdout.write("x" * 100_000 + "\\n")

        sys.exit(run_cli(command))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "frozen during the command: False"
    assert lines[1] == "x" * 100_000
    assert lines[-1] == "frozen at exit: True"


def test_val_help_and_a_mistyped_flag_answer_before_torch_is_imported() -> None:
    script = textwrap.dedent(
        """
        import contextlib, io, sys
        from detector.cli.val import main

        for argv in (["--help"], ["--no-such-flag"]):
            code = None
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as stop:
                    code = stop.code
            print(argv[0], code, "torch" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split("\n")[:2] == ["--help 0 False", "--no-such-flag 2 False"]


def test_run_cli_prints_a_dead_loader_worker_as_one_line(capsys) -> None:
    """val.py and detect.py: torch's RuntimeError from a really killed worker is one 'error:' line, exit status 2;
    any other RuntimeError stays a traceback (a bug must show where it is)."""
    loader = loader_whose_worker_dies()
    assert run_cli(lambda: next(iter(loader))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DataLoader worker (pid")
    assert "out-of-memory killer" in lines[0] and "try fewer --workers or a smaller --batch-size" in lines[0]

    def fails() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(fails)


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (PermissionError(1, "Operation not permitted", "/sys/x"), "error: /sys/x: Operation not permitted"),
        (OSError(28, "No space left on device"), "error: No space left on device"),
    ],
    ids=["path-refused", "disk-full"],
)
def test_the_file_systems_refusals_are_one_line(error: OSError, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    def command() -> None:
        raise error

    assert run_cli(command) == 2
    assert capsys.readouterr().err.strip() == line


def test_other_os_errors_are_not_hidden() -> None:
    def command() -> None:
        raise ConnectionResetError(104, "Connection reset by peer")  # no file: could be a bug, keep the traceback

    with pytest.raises(ConnectionResetError):
        run_cli(command)


def test_detector_command_names_an_unknown_task(capsys: pytest.CaptureFixture[str]) -> None:
    from detector.cli import main

    assert main([]) == 0 and "usage: detector {train,val," in capsys.readouterr().out
    assert main(["tran", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown task 'tran'; did you mean 'train'?"
    assert main(["xyz"]) == 2 and capsys.readouterr().err.strip() == "error: unknown task 'xyz'"


@pytest.mark.parametrize("task", ["train", "convert", "prune"])
def test_detector_command_names_itself_in_a_tasks_usage(task: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``detector TASK --help`` says ``usage: detector TASK``; the scripts keep their own names afterwards."""
    from detector.cli import main
    from detector.cli.train import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main([task, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: detector {task} [-h]")
    assert build_parser().prog == "train.py"
