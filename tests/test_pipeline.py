"""MudditPipeline: random-init T2I / I2T / VQA through the compiled sampler, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from muddit_jax.models.muddit import MudditConfig
from muddit_jax.pipeline import clean_caption
from tests.helpers import tiny_pipeline

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sp"), IMAGE_SIZE)


def test_generate_images_deterministic_and_compiled_once(pipe):
    a = pipe.generate(["a red circle", "a blue square"], steps=4, seed=1)
    assert a.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    b = pipe.generate(["a red circle", "a blue square"], steps=4, seed=1)
    np.testing.assert_array_equal(a, b)
    program = pipe._programs[next(k for k in pipe._programs if k[0] == "t2i")]
    pipe.generate(["a green triangle", "a small square"], steps=4, seed=2)
    assert program._cache_size() == 1, "a second call with new prompts recompiled"
    c = pipe.generate(["a red circle", "a blue square"], steps=4, seed=3)
    assert not np.array_equal(a, c), "the seed does not change the sample"


def test_per_example_seeds_decode_independently_of_the_batch(pipe):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    full = pipe.generate(prompts, steps=3, seed=[11, 12, 13])
    alone = pipe.generate(prompts[1:2], steps=3, seed=[12])
    np.testing.assert_array_equal(full[1], alone[0])
    caps = pipe.caption(full, steps=3, seed=[1, 2, 3])
    assert pipe.caption(full[2:], steps=3, seed=[3]) == caps[2:]
    with pytest.raises(ValueError, match="one int per example"):
        pipe.generate(prompts, seed=[1, 2])


def test_temperature_reaches_the_sampler(pipe):
    """Confidence noise changes which tokens are kept; its absence is deterministic per seed."""
    prompts = ["a red circle", "a blue square", "a green triangle", "a small square"]
    plain = pipe.generate(prompts, steps=4, seed=5, temperature=(0.0, 0.0))
    np.testing.assert_array_equal(plain, pipe.generate(prompts, steps=4, seed=5,
                                                       temperature=[0, 0]))
    noisy = pipe.generate(prompts, steps=4, seed=5, temperature=(50.0, 50.0))
    assert not np.array_equal(plain, noisy)


def test_guidance_none_and_scale_one_agree(pipe):
    a = pipe.generate(["a red circle"], steps=3, seed=0, guidance_scale=None)
    b = pipe.generate(["a red circle"], steps=3, seed=0, guidance_scale=1.0)
    np.testing.assert_array_equal(a, b)


def test_linear_guidance_schedule_starts_unconditional(pipe):
    """``guidance_schedule="linear"`` ramps the scale from 0: a one-step sample is the empty
    prompt's sample ("decay" starts at the full scale); a bad schedule names the field."""
    kw = dict(steps=1, seed=3, sampling="argmax", temperature=(0.0, 0.0), return_codes=True)
    _, ramped = pipe.generate(["a red circle", "a blue square"], guidance_scale=5.0,
                              guidance_schedule="linear", **kw)
    _, empty = pipe.generate(["", ""], guidance_scale=None, **kw)
    _, constant = pipe.generate(["a red circle", "a blue square"], guidance_scale=5.0, **kw)
    np.testing.assert_array_equal(ramped, empty)
    assert not np.array_equal(ramped, constant)
    # "decay" starts at the full scale: a one-step sample is the constant schedule's
    _, decayed = pipe.generate(["a red circle", "a blue square"], guidance_scale=5.0,
                               guidance_schedule="decay", **kw)
    np.testing.assert_array_equal(decayed, constant)
    with pytest.raises(ValueError, match="guidance_schedule"):
        pipe.generate(["a red circle"], guidance_scale=5.0, guidance_schedule="cosine", steps=2)


def test_inpainting_keeps_the_kept_codes(pipe):
    from muddit_jax.models.vq import encode

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    grid = IMAGE_SIZE // pipe.config.vq.downsample_factor
    keep = np.zeros((2, grid, grid), bool)
    keep[:, :, : grid // 2] = True
    out, codes = pipe.generate(["a red circle", "a blue square"], steps=3, guidance_scale=None,
                               images=images, keep=keep, return_codes=True)
    given = np.asarray(encode(pipe.params["vq"], pipe.config.vq, images / 255.0))
    assert out.shape == images.shape and codes.shape == given.shape
    np.testing.assert_array_equal(codes[keep], given[keep])
    assert (codes[~keep] != given[~keep]).any(), "the masked cells were not regenerated"
    assert codes.max() < pipe.config.mmdit.codebook_size


def test_caption_and_answer_produce_text_once_compiled(pipe):
    images = np.random.default_rng(0).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    caps = pipe.caption(images, steps=4, seed=0)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    assert caps == pipe.caption(images, steps=4, seed=0)
    answers = pipe.answer(images, ["a red circle", "a blue square"], steps=4)
    assert len(answers) == 2
    i2t = [k for k in pipe._programs if k[0] == "i2t" and k[1].num_steps == 4]
    assert len(i2t) == 1, "captioning and VQA with the same sampler config share one program"
    before = pipe._programs[i2t[0]]._cache_size()
    pipe.answer(images[::-1], ["a green circle", "a blue circle"], steps=4, seed=5)
    assert pipe._programs[i2t[0]]._cache_size() == before, "new inputs recompiled"


def test_vqa_prefix_stays_fixed(pipe):
    q = "a red circle"
    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    tokens, prefix = pipe.text_tokens(images, [q, ""], steps=3)
    ids = pipe.tokenizer.encode([q, ""], pipe.text_length)
    assert prefix.tolist() == [1 + len(pipe.tokenizer.sp.encode(q)), 1]
    np.testing.assert_array_equal(tokens[0, : prefix[0]], ids[0, : prefix[0]])
    assert tokens[1, 0] == pipe.tokenizer.bos_id
    assert not np.any(tokens == pipe.tokenizer.mask_id), "mask tokens left after decoding"


def test_max_tokens_decodes_only_the_bounded_region(pipe):
    """``max_tokens=k``: the ``k`` positions after the prefix are decoded, the rest keeps the
    prompt's padding; a bound at the text length decodes as no bound."""
    q = "a red circle"
    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    ids = pipe.tokenizer.encode([q, ""], pipe.text_length)
    free, prefix = pipe.text_tokens(images, [q, ""], steps=3, sampling="argmax")
    for k in (1, 3):
        tokens, _ = pipe.text_tokens(images, [q, ""], steps=3, sampling="argmax", max_tokens=k)
        for row, start in enumerate(prefix):
            np.testing.assert_array_equal(tokens[row, start + k:], pipe.tokenizer.pad_id)
            np.testing.assert_array_equal(tokens[row, :start], ids[row, :start])
            assert not np.any(tokens[row, start:start + k] == pipe.tokenizer.mask_id)
    assert not np.all(free[:, prefix.max():] == pipe.tokenizer.pad_id), "unbounded: all pad"
    # a bound past the text length is no bound
    np.testing.assert_array_equal(
        pipe.text_tokens(images, [q, ""], steps=3, sampling="argmax",
                         max_tokens=pipe.text_length)[0], free)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda p: p.generate([]), "prompts is empty"),
        (lambda p: p.generate("a red circle"), "not a single string"),
        (lambda p: p.generate(["x"], steps=0), "steps must be"),
        (lambda p: p.caption(np.zeros((1, 8, 8, 3), np.uint8)), "image_size"),
        (lambda p: p.answer(np.zeros((2, 16, 16, 3), np.uint8), ["q"]), "2 images but 1"),
        (lambda p: p("segment", []), "unknown task"),
        (lambda p: p.generate(["x"], images=np.zeros((1, 16, 16, 3))), "needs both"),
        (lambda p: p.generate(["x"], images=np.zeros((1, 16, 16, 3)), keep=np.ones((1, 2, 2))),
         "keep must be"),
        (lambda p: p.answer(np.zeros((1, 16, 16, 3)), ["what is " * 20]), "no room"),
        (lambda p: p.generate(["x"], temperature=(-1.0, 0.0)), "temperature must be"),
        (lambda p: p.generate(["x"], temperature=2.0), "temperature must be"),
        (lambda p: p.caption(np.zeros((1, 16, 16, 3)), max_tokens=0), "max_tokens=0"),
    ],
)
def test_bad_input_is_a_clear_value_error(pipe, call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call(pipe)


def test_clean_caption():
    assert clean_caption("a a red red circle. circle circle") == "a red circle."
    assert clean_caption("a blue square") == "a blue square"
    assert clean_caption("one. two. three") == "one. two."


def test_config_mismatch_is_reported():
    cfg = MudditConfig.tiny(40)
    import dataclasses

    with pytest.raises(ValueError, match="codebook_size"):
        MudditConfig(cfg.text, dataclasses.replace(cfg.vq, num_vq_embeddings=7), cfg.mmdit)


def test_text_is_sampled_only_from_the_tokenizer_vocab(tmp_path):
    """A model text vocab larger than the tokenizer's never yields undecodable ids."""
    from muddit_jax.models.muddit import MudditConfig
    from muddit_jax.models.tokenizers import SentencePieceTokenizer
    from muddit_jax.pipeline import MudditPipeline
    from tests.helpers import SHAPE_CORPUS

    tok = SentencePieceTokenizer.train(SHAPE_CORPUS, 40, tmp_path / "sp.model")
    config = MudditConfig.tiny(tok.vocab_size + 200, codebook_size=32, width=32)
    pipe = MudditPipeline.random_init(config, tok, IMAGE_SIZE)
    tokens, _ = pipe.text_tokens(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), ["", ""], steps=2)
    assert tokens.max() < tok.vocab_size
    assert len(pipe.caption(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), steps=2)) == 2


def test_params_of_another_model_config_are_refused(pipe):
    """A config that does not describe the params (an option the run was trained with left out,
    another width) fails at construction with the offending arrays named, instead of Flax
    silently ignoring the extra ones."""
    import dataclasses

    from muddit_jax.pipeline import MudditPipeline

    cfg = pipe.config
    with_conv = dataclasses.replace(cfg, mmdit=dataclasses.replace(cfg.mmdit, conv_blocks=1))
    trained = MudditPipeline.random_init(with_conv, pipe.tokenizer, IMAGE_SIZE, seed=0)
    with pytest.raises(ValueError, match=r"unexpected mmdit/down_convnext_0/.*--config\.model"):
        MudditPipeline(cfg, pipe.tokenizer, trained.params, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"missing mmdit/down_convnext_0"):
        MudditPipeline(with_conv, pipe.tokenizer, pipe.params, IMAGE_SIZE)
    wider = MudditConfig.tiny(cfg.text.vocab_size, codebook_size=32, width=64)
    with pytest.raises(ValueError, match=r"has shape .*, the config's model needs"):
        MudditPipeline(wider, pipe.tokenizer, pipe.params, IMAGE_SIZE)


def test_timestep_mode_reaches_every_task(pipe):
    """``timestep_mode="ratio"`` feeds the mask ratio (what training feeds) in T2I and I2T; it is
    part of the compiled sampler config and changes the samples; a bad value is refused."""
    import dataclasses

    ratio = dataclasses.replace(pipe, timestep_mode="ratio", _programs={})
    prompts = ["a red circle", "a blue square", "a green triangle", "a small square"]
    a = pipe.generate(prompts, steps=4, seed=7)
    b = ratio.generate(prompts, steps=4, seed=7)
    images = np.random.default_rng(1).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    ratio.caption(images, steps=4, seed=0)
    modes = {(task, cfg.timestep_mode) for task, cfg in ratio._programs}
    assert modes == {("t2i", "ratio"), ("i2t", "ratio")}
    assert not np.array_equal(a, b), "the fed timestep did not change the samples"
    with pytest.raises(ValueError, match="timestep_mode must be one of"):
        dataclasses.replace(pipe, timestep_mode="linear", _programs={})


def test_argmax_candidates_ignore_the_seed_where_multinomial_does_not(pipe):
    """With one step every masked token is decided at once from its logits: ``argmax`` then gives
    the same output for any seed, ``multinomial`` draws (a random-init model's logits are flat).
    ``top_k=1`` is argmax; images and text both honour the option."""
    prompts = ["a red circle", "a blue square", "a green triangle", "a small square"]
    arg = [pipe.generate(prompts, steps=1, seed=s, sampling="argmax") for s in (0, 1)]
    np.testing.assert_array_equal(arg[0], arg[1])
    np.testing.assert_array_equal(arg[0], pipe.generate(prompts, steps=1, seed=2,
                                                        sampling="top_k", top_k=1))
    multi = [pipe.generate(prompts, steps=1, seed=s) for s in (0, 1)]
    assert not np.array_equal(multi[0], multi[1])
    images = np.random.default_rng(2).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    text = [pipe.text_tokens(images, ["", "", "", ""], steps=1, seed=s, sampling="argmax")[0]
            for s in (0, 1)]
    np.testing.assert_array_equal(text[0], text[1])
    assert pipe.answer(images, ["what color?"] * 4, steps=1, seed=0, sampling="argmax") == \
        pipe.answer(images, ["what color?"] * 4, steps=1, seed=9, sampling="argmax")
    drawn = [pipe.text_tokens(images, ["", "", "", ""], steps=1, seed=s)[0] for s in (0, 1)]
    assert not np.array_equal(drawn[0], drawn[1])
    with pytest.raises(ValueError, match="sampling must be one of"):
        pipe.caption(images, steps=1, sampling="greedy")


def test_mask_text_padding_makes_extra_padding_invisible(pipe):
    """With ``mask_text_padding`` the padding is no MM-DiT key: a longer text sequence (more
    padding) gives the same T2I images and bounded captions (the text encoder is causal and text
    RoPE ids are 0); without it the same change moves the images. The run option reaches the
    model config (off by default; on for the muddit_512 preset when set)."""
    import dataclasses

    from muddit_jax.pipeline import MudditPipeline
    from muddit_jax.train import config as C

    prompts, images = ["a red circle", "a circle"], pipe.generate(["a square"], steps=2, seed=0)
    for on in (True, False):
        cfg = dataclasses.replace(pipe.config, mask_text_padding=on)
        short, long = (MudditPipeline(cfg, pipe.tokenizer, pipe.params, IMAGE_SIZE, text_length=n)
                       for n in (8, 16))
        same = np.array_equal(short.generate(prompts, steps=6, seed=1),
                              long.generate(prompts, steps=6, seed=1))
        assert same == on, f"mask_text_padding={on}: images equal={same}"
        if on:
            assert (short.caption(images, steps=3, seed=2, max_tokens=4)
                    == long.caption(images, steps=3, seed=2, max_tokens=4))
    c = C.base_config()
    assert not C.model_config(c).mask_text_padding
    c.model.update(mask_text_padding=True, preset="muddit_512")
    assert C.model_config(c).mask_text_padding

