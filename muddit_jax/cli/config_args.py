"""Shared ``--config`` (ml_collections config file + ``--config.<field>=value`` overrides) and
``--workdir`` parsing for ``muddit-train`` and ``muddit-eval``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

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


def parse(prog: str, argv: list[str] | None,
          define: Callable[[flags.FlagValues], None] | None = None) -> flags.FlagValues | None:
    """Parsed flags (``fv.config``, ``fv.workdir`` and those added by ``define``), or ``None``
    after printing the usage error when ``--config`` or ``--workdir`` is missing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fv = flags.FlagValues()
    with _argv([prog, *argv]):
        config_flags.DEFINE_config_file("config", None, "config file (get_config(arg))",
                                        flag_values=fv, lock_config=True)
        flags.DEFINE_string("workdir", None, "run folder", flag_values=fv)
        if define is not None:
            define(fv)
        fv([prog, *argv])
    if fv.config is None or not fv.workdir:
        print(f"{prog}: --config and --workdir are required", file=sys.stderr)
        return None
    return fv
