"""Analytic FLOP counts of Muddit for the configured shapes (for MFU).

Only matrix multiplications and convolutions are counted, as ``2 * M * N * K`` (a multiply-add is
two FLOPs); elementwise ops, norms, softmax and embedding gathers are ignored (a few percent at
realistic widths). With ``b`` examples, an ``h x w`` code grid, ``N`` image tokens inside the
MM-DiT (``h * w``, or ``h * w / 4^levels`` with ``downsample``), ``L`` text tokens, ``S = N + L``, width
``D``:

  dual-stream block    24 b S D^2 + 4 b S^2 D + 24 b D^2   (QKV 6, out 2, two 4x MLPs 16; attention
                                                             QK^T + AV 4 b S^2 D; two adaLN 6D)
  single-stream block  24 b S D^2 + 4 b S^2 D + 6 b D^2    (QKV 6, MLP-in 8, fused out 10)
  embeddings / heads   conv embed, down/up-sampling convs, projections, MLM head ``2 b hw D K``,
                       text head ``2 b L D V_text``, conditioning MLPs
  CLIP text layer      8 b L d^2 + 4 b L^2 d + 4 b L d I   (attention over all L x L positions)
  VQ encoder           every conv ``2 b H' W' k^2 C_in C_out`` + nearest-code search ``2 b h w e K``

A training step costs ``3x`` the forward FLOPs of the trainable sub-models (forward + backward
w.r.t. activations and weights) plus ``1x`` the forward of the frozen ones (the text encoder when
frozen, the VQ encoder when raw images are encoded in the step). Rematerialisation is not counted
(the usual *model* FLOPs utilisation).
"""

from __future__ import annotations

from muddit_jax.models.embeddings import NUM_MICRO_CONDS, TIMESTEP_FEATURES
from muddit_jax.models.mmdit import MMDiTConfig
from muddit_jax.models.muddit import MudditConfig
from muddit_jax.models.text_encoder import CLIPTextConfig
from muddit_jax.models.vq import VQConfig


def _mlp(b: int, d_in: int, hidden: int, d_out: int) -> float:
    return 2.0 * b * (d_in * hidden + hidden * d_out)


def mmdit_forward_flops(cfg: MMDiTConfig, b: int, h: int, w: int, text_len: int,
                        generated_rows: int | None = None) -> float:
    """FLOPs of one MM-DiT forward on ``[b, h, w]`` codes and ``[b, text_len]`` text states;
    ``generated_rows`` as the model takes it (with ``condition_image_input``, ``None`` runs both
    image input paths on every row, ``n`` upstream's on ``n`` rows and the condition's on the
    rest)."""
    d, hw, L = cfg.inner_dim, h * w, text_len
    n = hw // cfg.resample_factor ** 2
    s = n + L
    f = _mlp(b, cfg.pooled_projection_dim + NUM_MICRO_CONDS * TIMESTEP_FEATURES, d, d)  # cond
    f += _mlp(b, TIMESTEP_FEATURES, d, d) + _mlp(b, d, d, d)  # timestep + text embedders
    text_in = cfg.joint_attention_dim
    if cfg.t5_dim is not None:
        f += 2.0 * b * L * cfg.t5_dim * cfg.joint_attention_dim
    f += 2.0 * b * L * text_in * d  # context_embedder
    # one row's ConvNeXt block: depthwise conv + 4x MLP per code, and the conditioning mapper
    convnext = 2.0 * hw * (cfg.conv_kernel**2 * d + 8 * d * d) + 4.0 * d * d
    resampled = [hw // 4 ** (k + 1) for k in range(cfg.down_levels)]

    # an image input path on ``rows`` rows: 1x1 conv embed, ConvNeXt blocks, 2x2 stride-2
    # down-sampling convs, projection to the width
    def image_input(conv_blocks: int, rows: int) -> float:
        down = sum(2.0 * m * 4 * d * d for m in resampled)
        return rows * (2.0 * hw * d * d + conv_blocks * convnext + down + 2.0 * n * d * d)

    f += b * cfg.conv_blocks * convnext  # after the up-sampling
    if not cfg.condition_image_input:
        f += image_input(cfg.conv_blocks, b)
    else:  # with generated_rows=None every row runs both paths and keeps one
        n_gen = b if generated_rows is None else generated_rows
        n_cond = b if generated_rows is None else b - generated_rows
        f += image_input(cfg.conv_blocks, n_gen)
        f += image_input(cfg.conv_blocks + cfg.condition_conv_blocks, n_cond)
    attn = 4.0 * b * s * s * d
    f += cfg.num_layers * (24.0 * b * s * d * d + attn + 24.0 * b * d * d)
    f += cfg.num_single_layers * (24.0 * b * s * d * d + attn + 6.0 * b * d * d)
    if cfg.tokenizer_vocab_size is not None:
        f += 2.0 * b * L * d * cfg.tokenizer_vocab_size
    f += 2.0 * b * n * d * d  # project_from_hidden
    if cfg.upsample:
        f += sum(2.0 * b * m * 4 * d * d for m in resampled)  # 2x2 stride-2 transposed convs
    f += 2.0 * b * hw * d * d + 2.0 * b * hw * d * cfg.codebook_size  # mlm_layer
    return f


def text_encoder_forward_flops(cfg: CLIPTextConfig, b: int, text_len: int) -> float:
    """FLOPs of one CLIP text-tower forward on ``[b, text_len]`` ids."""
    d, L, i = cfg.hidden_size, text_len, cfg.intermediate_size
    layer = 8.0 * b * L * d * d + 4.0 * b * L * L * d + 4.0 * b * L * d * i
    return cfg.num_hidden_layers * layer + 2.0 * b * d * cfg.projection_dim


def _conv(b: int, hw: int, k: int, c_in: int, c_out: int) -> float:
    return 2.0 * b * hw * k * k * c_in * c_out


def vq_encode_flops(cfg: VQConfig, b: int, height: int, width: int) -> float:
    """FLOPs of ``VQModel.encode`` on ``[b, height, width, in_channels]`` images."""
    chans = cfg.block_out_channels
    hw = height * width
    f = _conv(b, hw, 3, cfg.in_channels, chans[0])
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for _ in range(cfg.layers_per_block):
            f += _conv(b, hw, 3, c_prev, c) + _conv(b, hw, 3, c, c)
            if c_prev != c:
                f += _conv(b, hw, 1, c_prev, c)
            c_prev = c
        if i < len(chans) - 1:
            hw //= 4
            f += _conv(b, hw, 3, c, c)  # stride-2 conv, counted at output resolution
    c = chans[-1]
    f += 2 * 2 * _conv(b, hw, 3, c, c)  # mid block: two ResNets of two convs
    if cfg.mid_block_add_attention:
        f += 4 * 2.0 * b * hw * c * c + 4.0 * b * hw * hw * c
    f += _conv(b, hw, 3, c, cfg.latent_channels)  # conv_out
    f += _conv(b, hw, 1, cfg.latent_channels, cfg.embed_dim)  # quant_conv
    f += 2.0 * b * hw * cfg.embed_dim * cfg.num_vq_embeddings  # nearest-code search
    return f


def train_step_flops(
    cfg: MudditConfig, *, batch: int, grid: int, text_len: int,
    trainable: tuple[str, ...] = ("mmdit",), images: bool = False,
    generated_rows: int | None = None,
) -> float:
    """Model FLOPs of one training step on ``batch`` examples (see the module docstring);
    ``generated_rows`` as :func:`mmdit_forward_flops` takes it."""
    parts = {
        "mmdit": mmdit_forward_flops(cfg.mmdit, batch, grid, grid, text_len, generated_rows),
        "text_encoder": text_encoder_forward_flops(cfg.text, batch, text_len),
    }
    total = sum((3.0 if name in trainable else 1.0) * f for name, f in parts.items())
    if images:
        size = grid * cfg.vq.downsample_factor
        total += vq_encode_flops(cfg.vq, batch, size, size)
    return total
