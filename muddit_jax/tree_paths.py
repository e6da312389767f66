"""Select leaves of a parameter tree by regexes over their ``/``-joined paths.

A leaf's name joins its dict keys, e.g. ``mmdit/embed/embeddings/embedding`` or
``mmdit/transformer_blocks_0/attn/to_q/kernel``. Options that pick parameters
(``optim.freeze``, ``loss.t2i_stop_gradient``) take comma-separated regexes that must match a
whole name; a regex that matches no leaf is an error, so a typo cannot silently select nothing.
"""

from __future__ import annotations

import re
from typing import Any

import jax


def leaf_name(path: tuple) -> str:
    """The ``/``-joined keys of a ``tree_*_with_path`` path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def parse_patterns(patterns: str) -> list[str]:
    """The comma-separated regexes of ``patterns`` (blank entries dropped)."""
    return [p.strip() for p in patterns.split(",") if p.strip()]


def match_leaves(params: Any, patterns: str, field: str) -> Any:
    """A bool tree shaped like ``params``: True where a leaf's name fully matches one of the
    comma-separated regexes. Raises ``ValueError`` naming ``field`` when a regex matches no leaf
    (an empty tree, such as optax's placeholder, is not checked)."""
    regexes = parse_patterns(patterns)
    names = [leaf_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for rx in regexes if names else ():
        if not any(re.fullmatch(rx, n) for n in names):
            raise ValueError(f"{field}: {rx!r} matches no parameter; paths look like "
                             f"{names[0]!r} (a regex over the full path)")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(re.fullmatch(rx, leaf_name(path)) for rx in regexes), params)
