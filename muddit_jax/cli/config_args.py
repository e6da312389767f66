"""Shared ``--config`` (ml_collections config file + ``--config.<field>=value`` overrides) and
``--workdir`` parsing for ``muddit-train`` and ``muddit-eval``."""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from absl import flags
from ml_collections import config_flags


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    # config_flags reads sys.argv while defining --config to learn the override flags
    saved, sys.argv = sys.argv, argv
    try:
        yield
    finally:
        sys.argv = saved


def _innermost_message(e: BaseException) -> str:
    """ml_collections wraps a KeyError ("'name'\nDid you mean ...") in an AttributeError."""
    msg: object = e
    while isinstance(msg, BaseException) and msg.args:
        msg = msg.args[0]
    return " ".join(str(msg).split())


def _raised_by_override(e: BaseException) -> bool:
    """Whether ``e`` came from resolving a ``--config.<field>`` path (ml_collections'
    ``config_path``), not from running the config file."""
    return any(Path(f.filename).name == "config_path.py" and "ml_collections" in f.filename
               for f in traceback.extract_tb(e.__traceback__))


def parse(prog: str, argv: list[str] | None,
          define: Callable[[flags.FlagValues], None] | None = None) -> flags.FlagValues | None:
    """Parsed flags (``fv.config``, ``fv.workdir`` and those added by ``define``), or ``None``
    after printing the usage error (a missing ``--config``/``--workdir``, an unknown or bad
    flag). ``-h``/``--help`` prints the flags and exits with status 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fv = flags.FlagValues()
    # before parsing: parsing loads the config file, which help does not need
    wants_help = any(a in ("-h", "--help", "-help") for a in argv)
    with _argv([prog, *argv]):
        config_flags.DEFINE_config_file("config", None, "config file (get_config(arg)); override "
                                        "any field with --config.<field>=value",
                                        flag_values=fv, lock_config=True)
        flags.DEFINE_string("workdir", None, "run folder", flag_values=fv)
        if define is not None:
            define(fv)
        if wants_help:
            print(f"usage: {prog} --config FILE[:ARG] --workdir DIR [flags]\n{fv.get_help()}")
            raise SystemExit(0)
        try:
            fv([prog, *argv])
        except flags.Error as e:
            print(f"{prog}: {e} (run {prog} --help for the flags)", file=sys.stderr)
            return None
        except (AttributeError, KeyError) as e:
            if not _raised_by_override(e):  # a bug inside the config file: its own traceback
                raise
            print(f"{prog}: no such config field in a --config.<field> override: "
                  f"{_innermost_message(e)}", file=sys.stderr)
            return None
    if fv.config is None or not fv.workdir:
        print(f"{prog}: --config and --workdir are required", file=sys.stderr)
        return None
    return fv
