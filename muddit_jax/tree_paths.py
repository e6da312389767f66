"""Select leaves of a parameter tree by regexes over their ``/``-joined paths.

A leaf's name joins its dict keys, e.g. ``mmdit/embed/embeddings/embedding`` or
``mmdit/transformer_blocks_0/attn/to_q/kernel``. Options that pick parameters
(``optim.freeze``, ``loss.t2i_stop_gradient``) take comma-separated regexes that must match a
whole name; a regex that matches no leaf is an error, so a typo cannot silently select nothing.
An entry ``@group`` stands for one of the named parts of the model in :data:`PARAM_GROUPS`
(``@image_input``, ``@blocks``, ...), so a command line need not spell the regexes out.
"""

from __future__ import annotations

import re
from typing import Any

import jax

from muddit_jax.models.mmdit import CONDITION_PREFIX, IMAGE_INPUT_MODULES


_M = "mmdit/"
_DUAL, _SINGLE = r"transformer_blocks_\d+/.*", r"single_transformer_blocks_\d+/.*"
# the image input path: code embedding (+ RMSNorm, 1x1 conv), ConvNeXt blocks, down-sampling,
# projection, positions
_IMAGE_INPUT = f"({IMAGE_INPUT_MODULES})(/.*)?"
# the MM-DiT's parts in data-flow order, and the text encoder; each group is one regex
PARAM_GROUPS: dict[str, str] = {
    "image_input": _M + _IMAGE_INPUT,
    # condition_image_input's copy of that path, for images without a mask token
    "condition_image_input": _M + CONDITION_PREFIX + _IMAGE_INPUT,
    # the text encoder's states into the text stream (T5 adapter, context projection, registers)
    "text_input": _M + r"(adapter(_norm)?|context_embedder|encoder_proj_layer_norm"
                  r"|text_registers)(/.*)?",
    # timestep, pooled-text and micro-condition embeddings (the adaLN input)
    "conditioning": _M + r"(time_text_embed|cond_embed)/.*",
    "dual_blocks": _M + _DUAL,
    "single_blocks": _M + _SINGLE,
    "blocks": _M + f"({_DUAL}|{_SINGLE})",
    "image_head": _M + r"(project_from_hidden(_norm)?|up_block(_\d+)?|up_convnext_\d+"
                  r"|mlm_layer)(/.*)?",
    "text_head": _M + r"text_decoder(_norm)?(/.*)?",
    "text_encoder": r"text_encoder/.*",
}


def leaf_name(path: tuple) -> str:
    """The ``/``-joined keys of a ``tree_*_with_path`` path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _regex(entry: str, field: str) -> str:
    """``entry`` itself, or the regex of the ``@group`` it names (unknown: ``ValueError``)."""
    if not entry.startswith("@"):
        return entry
    if entry[1:] not in PARAM_GROUPS:
        raise ValueError(f"{field}: unknown parameter group {entry!r}; the groups are "
                         + ", ".join("@" + g for g in PARAM_GROUPS))
    return PARAM_GROUPS[entry[1:]]


def match_leaves(params: Any, patterns: str, field: str) -> Any:
    """A bool tree shaped like ``params``: True where a leaf's name fully matches one of the
    comma-separated regexes or ``@group`` names. Raises ``ValueError`` naming ``field`` when an
    entry matches no leaf (an empty tree, such as optax's placeholder, is not checked)."""
    entries = [p.strip() for p in patterns.split(",") if p.strip()]
    regexes = [_regex(e, field) for e in entries]
    names = [leaf_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for entry, rx in zip(entries, regexes) if names else ():
        if not any(re.fullmatch(rx, n) for n in names):
            raise ValueError(f"{field}: {entry!r} matches no parameter; paths look like "
                             f"{names[0]!r} (a regex over the full path, or an @group)")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(re.fullmatch(rx, leaf_name(path)) for rx in regexes), params)
