"""Parameter selection by path (``muddit_jax.tree_paths``): regexes, ``@group`` names, errors."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from muddit_jax.models.mmdit import MMDiTConfig
from muddit_jax.models.text_encoder import CLIPTextConfig
from muddit_jax.port import clip_text, mmdit
from muddit_jax.tree_paths import PARAM_GROUPS, leaf_name, match_leaves

# every optional MM-DiT part on: down/up-sampling, ConvNeXt blocks, positions, registers, T5
MMDIT = MMDiTConfig(
    patch_size=1, in_channels=32, num_layers=2, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
    guidance_embeds=False, axes_dims_rope=(4, 6, 6), vocab_size=33, codebook_size=32,
    tokenizer_vocab_size=40, downsample=True, upsample=True, conv_blocks=1,
    image_pos_embed=True, text_registers=2, t5_dim=20, condition_image_input=True,
)
# disjoint; "blocks" = the two block kinds
PARTS = ("image_input", "condition_image_input", "text_input", "conditioning", "dual_blocks",
         "single_blocks", "image_head", "text_head", "text_encoder")


@pytest.fixture(scope="module")
def names() -> list[str]:
    params = {"mmdit": mmdit.target_params(MMDIT),
              "text_encoder": clip_text.target_params(CLIPTextConfig.tiny(40))}
    return [leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def _selected(names: list[str], patterns: str) -> set[str]:
    tree = match_leaves({n: 0 for n in names}, patterns, "optim.freeze")
    return {n for n, hit in tree.items() if hit}


def test_groups_split_every_parameter_once(names: list[str]) -> None:
    """Each leaf of a model with every optional part lies in exactly one part, and each part
    is non-empty, so a new module must be given a group (or this test fails)."""
    assert set(PARTS) | {"blocks"} == set(PARAM_GROUPS)
    owners = {n: [g for g in PARTS if re.fullmatch(PARAM_GROUPS[g], n)] for n in names}
    assert {n: o for n, o in owners.items() if len(o) != 1} == {}
    assert all(any(o == [g] for o in owners.values()) for g in PARTS)
    both = _selected(names, "@dual_blocks, @single_blocks")
    assert _selected(names, "@blocks") == both and len(both) > 10


def test_groups_name_the_expected_modules(names: list[str]) -> None:
    image_input = _selected(names, "@image_input")
    assert "mmdit/embed/embeddings/embedding" in image_input
    assert "mmdit/image_pos_embed" in image_input
    assert {n.split("/")[1] for n in image_input} == {
        "embed", "down_convnext_0", "down_block", "project_to_hidden_norm", "project_to_hidden",
        "image_pos_embed"}
    assert {n.split("/")[1] for n in _selected(names, "@condition_image_input")} == {
        "condition_" + n.split("/")[1] for n in image_input}
    assert {n.split("/")[1] for n in _selected(names, "@image_head")} == {
        "project_from_hidden_norm", "project_from_hidden", "up_block", "up_convnext_0",
        "mlm_layer"}
    assert {n.split("/")[1] for n in _selected(names, "@text_input")} == {
        "adapter", "context_embedder", "encoder_proj_layer_norm", "text_registers"}


def test_groups_mix_with_regexes_and_errors_name_the_field(names: list[str]) -> None:
    mixed = _selected(names, "@text_head, mmdit/transformer_blocks_0/.*")
    assert mixed == ({n for n in names if n.startswith("mmdit/text_decoder")}
                     | {n for n in names if n.startswith("mmdit/transformer_blocks_0/")})
    with pytest.raises(ValueError, match=r"optim.freeze: unknown parameter group '@image'; "
                                         r"the groups are @image_input, "
                                         r"@condition_image_input, @text_input"):
        _selected(names, "@image")
    with pytest.raises(ValueError, match="loss.t2i_stop_gradient: '@text_encoder' matches no"):
        match_leaves({"mmdit": {"w": np.zeros(2)}}, "@text_encoder", "loss.t2i_stop_gradient")
