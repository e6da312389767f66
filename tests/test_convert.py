"""``muddit-convert`` on a Muddit-layout pipeline folder written by the tests."""

from __future__ import annotations

import numpy as np
import pytest

from muddit_jax.cli.convert import main as convert_main
from muddit_jax.port import convert as conv
from muddit_jax.port import clip_text, mmdit, vq
from muddit_jax.pipeline import MudditPipeline
from muddit_jax.port.mapping import PortError, flatten

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

MMDIT_CFG = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
    guidance_embeds=False, axes_dims_rope=[2, 2, 4], vocab_size=17, codebook_size=16,
    tokenizer_vocab_size=515, downsample=False, upsample=False,
)
VQ_CFG = dict(
    block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4,
    num_vq_embeddings=16, norm_num_groups=4,
)
CLIP_CFG = dict(
    vocab_size=514, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=8, pad_token_id=513, bos_token_id=512,
    eos_token_id=513,
)


def _byte_level_clip_tokenizer(folder):
    """A CLIP BPE folder with no merges: 256 byte symbols, their ``</w>`` forms, bos, eos."""
    import json

    from muddit_jax.models.tokenizers import byte_to_unicode

    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """transformer/ vqvae/ text_encoder/ tokenizer/ + mask_token_embedding.pth, as Muddit ships."""
    from muddit_jax.port.torch_reference import SymmetricTransformer2DModel, save_reference

    root = tmp_path_factory.mktemp("muddit_pipeline")
    torch.manual_seed(0)
    save_reference(SymmetricTransformer2DModel(**MMDIT_CFG), MMDIT_CFG, root / "transformer")
    diffusers.VQModel(**VQ_CFG).save_pretrained(root / "vqvae")
    clip = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_CFG))
    clip.save_pretrained(root / "text_encoder")
    _byte_level_clip_tokenizer(root / "tokenizer")
    torch.save(torch.arange(16, dtype=torch.float32), root / "mask_token_embedding.pth")
    return root


def _assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_cli_converts_pipeline_and_output_loads(pipeline_folder, tmp_path, capsys):
    dst = tmp_path / "converted"
    assert convert_main(["--src", str(pipeline_folder), "--dst", str(dst)]) == 0
    assert "transformer" in capsys.readouterr().out
    loaded = conv.load_converted(dst)
    assert sorted(loaded) == ["text_encoder", "transformer", "vqvae"]
    for name, port in (("transformer", mmdit), ("vqvae", vq), ("text_encoder", clip_text)):
        config, params = port.load_pretrained(pipeline_folder / name)
        assert loaded[name][0] == config
        _assert_same_params(loaded[name][1], params)
    assert (dst / "tokenizer" / "vocab.json").is_file()
    pipe = MudditPipeline.from_converted(dst, image_size=8, text_length=8)
    assert pipe.tokenizer.mask_id == 514 and pipe.config.text.vocab_size == 515
    table = np.asarray(pipe.params["text_encoder"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(table[514], np.arange(16))
    assert pipe.generate(["a cat"], steps=2).shape == (1, 8, 8, 3)
    assert isinstance(pipe.caption(np.zeros((1, 8, 8, 3), np.uint8), steps=2)[0], str)
    mask = np.load(dst / "text_encoder" / "mask_token_embedding.npy")
    np.testing.assert_array_equal(mask, np.arange(16))


def test_single_component_and_existing_destination(pipeline_folder, tmp_path):
    dst = tmp_path / "vq_only"
    assert conv.convert(pipeline_folder / "vqvae", dst) == ["vqvae"]
    assert list(conv.load_converted(dst)) == ["vqvae"]
    with pytest.raises(PortError, match="already exists"):
        conv.convert(pipeline_folder / "vqvae", dst)
    assert convert_main(["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "x")]) == 2


def test_failed_conversion_leaves_nothing_behind(pipeline_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config, params = vq.load_pretrained(pipeline_folder / "vqvae")
    sd = vq.export(params, config)
    sd.pop("quant_conv.weight")
    from muddit_jax.port import io

    io.save_safetensors(sd, broken / "diffusion_pytorch_model.safetensors")
    (broken / "config.json").write_text((pipeline_folder / "vqvae" / "config.json").read_text())
    with pytest.raises(PortError, match="quant_conv.weight"):
        conv.convert(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_unknown_component_is_a_clear_error():
    with pytest.raises(PortError, match="cannot tell which component"):
        conv.detect_component({"_class_name": "UNet2DModel"})


def test_muddit_sample_cli_on_converted_checkpoint(pipeline_folder, tmp_path, capsys):
    from muddit_jax.cli.sample import main as sample_main

    dst = tmp_path / "converted"
    conv.convert(pipeline_folder, dst)
    common = ["--checkpoint", str(dst), "--image-size", "8", "--steps", "2"]
    assert sample_main(common + ["--prompt", "a cat", "--out", str(tmp_path / "a.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "a.png").size == (8, 8)
    capsys.readouterr()
    assert sample_main(common + ["--image", str(tmp_path / "a.png")]) == 0
    assert sample_main(common + ["--image", str(tmp_path / "a.png"), "--question", "what?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert sample_main(common + ["--image", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
