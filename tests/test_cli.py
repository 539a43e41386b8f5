"""`casa.cli.main`: how every command ends. User errors are one line and exit 2,
internal errors one line + a traceback log and exit 1, Ctrl-C one line and exit
130; all through the real command in a subprocess."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import byte_model_dir, run_casa, snapshot


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return byte_model_dir(tmp_path_factory.mktemp("cli") / "m")


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    r = run_casa("eval", "--checkpoint", tmp_path, "--n", "0")  # argparse refuses the value
    assert (r.returncode, r.stderr) == (2, "casa: error: argument --n: '0' is not a whole number > 0 "
                                           "(see 'casa eval --help')\n")
    r = run_casa()
    assert (r.returncode, r.stderr) == (2, "casa: error: the following arguments are required: command "
                                           "(see 'casa --help')\n")
    r = run_casa("eval", "--checkpoint", tmp_path / "nothing")  # a command's FileNotFoundError
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"casa: error: {str(tmp_path / 'nothing')!r} is not a casa model directory (no config.json) "
                        "nor a training run with checkpoints\n")


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_internal_error_is_one_line_with_a_logged_traceback(tmp_path, model_dir):
    # a data file whose reading fails with EIO: a real, unexpected I/O error, not a user error
    data = tmp_path / "eio.jsonl"
    data.symlink_to("/proc/self/mem")
    logs = tmp_path / "logs"
    r = run_casa("eval", "--checkpoint", model_dir, "--data", data, env={"CASA_LOG_DIR": str(logs)})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    m = re.fullmatch(r"casa: internal error: OSError: \[Errno 5\] Input/output error \(traceback in (.+)\)\n",
                     r.stderr)
    assert m, r.stderr
    log = Path(m.group(1))
    assert log.parent == logs and [p.name for p in logs.iterdir()] == [log.name]
    text = log.read_text()
    assert text.startswith(f"command: casa eval --checkpoint {model_dir} --data {data}\n")
    assert "Traceback (most recent call last)" in text and "in read_jsonl" in text
    assert text.rstrip().endswith("OSError: [Errno 5] Input/output error")

    debug = run_casa("eval", "--checkpoint", model_dir, "--data", data,
                     env={"CASA_LOG_DIR": str(tmp_path / "logs2"), "CASA_DEBUG": "1"})
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "in read_jsonl" in debug.stderr
    assert debug.stderr.endswith("casa: internal error: OSError: [Errno 5] Input/output error\n")
    assert not (tmp_path / "logs2").exists()  # shown inline instead


def _interrupt_once_started(args, cwd, settle: float = 0.0):
    """Start the real `casa ARGS`, wait until it loads torch (its start-up), then send SIGINT."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CASA_DEBUG": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "casa.cli", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{proc.pid}/maps")

    def loading_torch() -> bool:
        try:
            return "libtorch" in maps.read_text()
        except OSError:  # the process is gone: nothing to wait for
            return True

    deadline = time.monotonic() + 60
    while proc.poll() is None and not loading_torch() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(settle)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_ctrl_c_is_one_line_exit_130_and_loses_nothing(tmp_path, model_dir):
    # at start-up, while torch loads
    rc, out, err = _interrupt_once_started(["eval", "--checkpoint", model_dir, "--n", "64",
                                            "--json", tmp_path / "eval.json"], tmp_path)
    assert (rc, err) == (130, "casa: interrupted\n") and out == ""
    assert not (tmp_path / "eval.json").exists()
    # during the work: an earlier export of the same task is left exactly as it was
    export = tmp_path / "export"
    assert run_casa("data", "export", "--task", "color", "--n", "2", export).returncode == 0
    before = snapshot(export)
    rc, out, err = _interrupt_once_started(["data", "export", "--task", "color", "--n", "1000000", export], tmp_path,
                                           settle=1.0)
    assert (rc, err) == (130, "casa: interrupted\n")
    assert snapshot(export) == before and sorted(p.name for p in (export / "images").iterdir()) == ["color"]


def test_cli_benchmark_names_are_the_benchmarks():
    from casa.cli.eval import BENCHMARK_NAMES
    from casa.eval.stdbench import BENCHMARKS

    assert sorted(BENCHMARK_NAMES) == sorted(BENCHMARKS)


def _options(parser, name="casa"):
    """(command, action) for every option and positional of every subcommand, recursively."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _options(child, f"{name} {sub}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield name, action


def test_every_option_of_every_command_has_help_and_its_default_shows(capsys):
    from casa.cli import build_parser

    options = list(_options(build_parser()))
    assert len({name for name, _ in options}) >= 18  # every command and bench / data subcommand was walked
    undocumented = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, a in options if not a.help]
    assert not undocumented, undocumented
    from casa.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "stream", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "generated tokens per turn (default: 8)" in text and "(default: 4 GiB)" in text
    assert "--plot PLOT PNG of TTFT, cache and memory vs turn --image-tokens" in text  # no "(default: None)"
    assert "random seed of the model (default: 0)" in text


def test_version_and_task_lists():
    from casa.cli.values import TASK_NAMES
    from casa.data.tasks import TASKS

    assert set(TASK_NAMES) == set(TASKS)
    r = run_casa("--version")
    assert r.returncode == 0 and re.fullmatch(r"casa \d+\.\d+\.\d+\S*\n", r.stdout), r
    r = run_casa("data", "export", "--help")
    assert ", ".join(TASKS) in " ".join(r.stdout.split())
