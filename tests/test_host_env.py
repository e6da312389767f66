"""The CLIs re-execute themselves once with glibc's allocator settings (muddit_jax/cli/host_env)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from muddit_jax.cli import eval as eval_cli
from muddit_jax.cli import host_env
from muddit_jax.cli import train as train_cli


class Reexec(Exception):
    pass


@pytest.fixture
def execs(monkeypatch):
    """Records ``os.execve`` calls (and stops there) in a process without the settings."""
    for key in (*host_env.HOST_ENV, host_env.OPT_OUT):
        monkeypatch.delenv(key, raising=False)
    calls = []

    def fake_execve(path, args, env):
        calls.append((path, args, env))
        raise Reexec

    monkeypatch.setattr(os, "execve", fake_execve)
    return calls


def test_reexec_adds_the_settings_and_keeps_the_users(execs, monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    with pytest.raises(Reexec):
        host_env.reexec_with_host_env("some.module", ["--a=1", "b"])
    [(path, args, env)] = execs
    assert path == sys.executable and args == [sys.executable, "-m", "some.module", "--a=1", "b"]
    assert env["MALLOC_ARENA_MAX"] == "4"  # the user's value wins
    assert env["MALLOC_TRIM_THRESHOLD_"] == env["MALLOC_MMAP_THRESHOLD_"] == str(2**32)
    assert env["PATH"] == os.environ["PATH"]


def test_no_reexec_once_set_or_when_opted_out(execs, monkeypatch) -> None:
    monkeypatch.setenv(host_env.OPT_OUT, "1")
    host_env.reexec_with_host_env("some.module", [])
    monkeypatch.delenv(host_env.OPT_OUT)
    for key, value in host_env.HOST_ENV.items():
        monkeypatch.setenv(key, value)
    host_env.reexec_with_host_env("some.module", [])
    assert execs == []


@pytest.mark.parametrize("cli, module", [(train_cli, "muddit_jax.cli.train"),
                                         (eval_cli, "muddit_jax.cli.eval")])
def test_console_scripts_reexec_and_in_process_calls_do_not(cli, module, execs,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["muddit-x", "--workdir=w", "--config=c.py"])
    with pytest.raises(Reexec):
        cli.main()
    assert execs[0][1][1:] == ["-m", module, "--workdir=w", "--config=c.py"]
    assert cli.main(["--workdir=w"]) == 2  # no --config: the usual error, in this process
    assert len(execs) == 1


def test_a_real_reexec_reaches_the_module_with_the_settings(tmp_path) -> None:
    keys = list(host_env.HOST_ENV)
    (tmp_path / "probe.py").write_text(
        f"import os, sys; print(sys.argv[1:], [os.environ[k] for k in {keys!r}])")
    env = {k: v for k, v in os.environ.items() if k not in host_env.HOST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    code = ("import sys; from muddit_jax.cli import host_env; "
            "host_env.reexec_with_host_env('probe', sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, "x", "--y"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{['x', '--y']} {list(host_env.HOST_ENV.values())}"
