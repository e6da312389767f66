"""Public API: ``MudditPipeline.generate / caption / answer``.

The pipeline bundles the tokenizer, the text encoder + MM-DiT (:class:`~muddit_jax.models.muddit.
Muddit`), the VQ tokenizer and the compiled sampler. Every task is one ``jax.jit`` program (text
encoding, the whole ``lax.scan`` sampling loop and VQ encode/decode inside), compiled once per
(task, sampler config, batch shape) and cached on the pipeline.

* ``generate`` (T2I): image tokens start masked, the prompt is the condition; classifier-free
  guidance stacks the empty-prompt condition in the same forward.
* ``caption`` (I2T): the image codes are the condition, text tokens after ``<bos>`` start masked
  and are re-encoded by the text encoder on every step, as in Muddit.
* ``answer`` (VQA): ``<bos> question`` is a fixed prefix, the answer region is decoded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muddit_jax.diffusion.sampler import (
    CONFIDENCE_TEMPERATURE, TIMESTEP_MODES, SamplerConfig, sample,
)
from muddit_jax.models.muddit import Muddit, MudditConfig, text_keys
from muddit_jax.models.tokenizers import Tokenizer
from muddit_jax.models.vq import VQModel

TASKS = ("t2i", "i2t", "vqa")
Seed = int | Sequence[int]
DEFAULT_AESTHETIC = 6.0


def clean_caption(text: str) -> str:
    """Muddit's caption post-processing: drop immediately repeated words, cut after the last period."""
    words: list[str] = []
    for word in text.split():
        if not words or word.lower() != words[-1].lower():
            words.append(word)
    out = " ".join(words)
    return out[: out.rfind(".") + 1] if "." in out else out


@dataclasses.dataclass
class MudditPipeline:
    """Tokenizer + params of the three networks + compiled samplers.

    Attributes:
      config: the networks' configs.
      tokenizer: encodes prompts / decodes generated text (needs ``mask_id``).
      params: ``{"text_encoder": ..., "mmdit": ..., "vq": ...}`` (unboxed).
      image_size: pixel resolution of generated / accepted images (square).
      text_length: token length of the text sequence (default: the text encoder's positions).
      dtype: compute dtype of the networks.
      mesh: optional device mesh for data-parallel sampling: params are replicated on it and
        every batch is split along its leading axis over all mesh devices (the batch size must
        be a multiple of the device count).
      timestep_mode: the timestep fed at sampling step ``i`` of ``T`` (every task):
        ``"pipeline"`` feeds ``(T - 1 - i) / T`` as Muddit's released pipeline does (for ported
        checkpoints); ``"ratio"`` feeds the input's mask ratio, the quantity this repo's
        training feeds (:func:`~muddit_jax.diffusion.sampler.model_timestep`).
    """

    config: MudditConfig
    tokenizer: Tokenizer
    params: dict[str, Any]
    image_size: int
    text_length: int | None = None
    dtype: Any = jnp.float32
    mesh: jax.sharding.Mesh | None = None
    timestep_mode: str = "pipeline"
    _programs: dict[tuple, Callable] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        f = self.config.vq.downsample_factor
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the VQ factor {f}")
        if getattr(self.tokenizer, "mask_id", None) is None:
            raise ValueError("the tokenizer has no <mask> id; train/load it with a mask token")
        if self.tokenizer.vocab_size > self.config.text.vocab_size:
            raise ValueError(
                f"tokenizer vocab ({self.tokenizer.vocab_size}) exceeds text.vocab_size "
                f"({self.config.text.vocab_size})"
            )
        if self.timestep_mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep_mode must be one of {TIMESTEP_MODES} ('ratio' for models "
                             f"trained here, 'pipeline' for ported ones), got {self.timestep_mode!r}")
        self.text_length = self.text_length or self.config.text.max_position_embeddings
        if self.text_length > self.config.text.max_position_embeddings:
            raise ValueError(
                f"text_length {self.text_length} exceeds the text encoder's "
                f"max_position_embeddings {self.config.text.max_position_embeddings}"
            )
        check_params(self.config, self.params, self.image_size, self.text_length)
        if self.mesh is not None:
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            self.params = jax.device_put(self.params, replicated)
        self.muddit = Muddit(self.config, dtype=self.dtype)
        self.vq = VQModel(self.config.vq, dtype=self.dtype)

    # -----------------------------------------------------------------------------------------
    # construction

    @classmethod
    def random_init(
        cls, config: MudditConfig, tokenizer: Tokenizer, image_size: int, seed: int = 0, **kw: Any
    ) -> "MudditPipeline":
        """A pipeline with freshly initialised (untrained) networks."""
        l = kw.get("text_length") or config.text.max_position_embeddings
        params = jax.jit(lambda key: init_params(config, image_size, l, key))(
            jax.random.key(seed))
        return cls(config, tokenizer, params, image_size, **kw)

    @classmethod
    def from_converted(
        cls, path: str | os.PathLike, image_size: int = 512, seed: int = 0, **kw: Any
    ) -> "MudditPipeline":
        """Load a ``muddit-convert`` output of a whole Muddit pipeline folder.

        The CLIP tokenizer gets Muddit's ``<mask>`` token and the text encoder its row (filled
        from ``mask_token_embedding`` when the release ships it, else initialised as
        transformers' ``resize_token_embeddings`` does, with ``seed``).
        """
        from muddit_jax.port.convert import converted_pipeline

        if not (Path(path) / "tokenizer").is_dir():
            raise ValueError(f"{path} lacks tokenizer/; convert the whole pipeline folder "
                             "(transformer/, vqvae/, text_encoder/, tokenizer/) with muddit-convert")
        config, tok, params = converted_pipeline(path, seed)
        return cls(config, tok, params, image_size, **kw)

    # -----------------------------------------------------------------------------------------
    # public tasks

    def __call__(self, task: str, *args: Any, **kw: Any) -> Any:
        """Dispatch ``task`` in ``("t2i", "i2t", "vqa")`` to generate / caption / answer."""
        fns = {"t2i": self.generate, "i2t": self.caption, "vqa": self.answer}
        if task not in fns:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        return fns[task](*args, **kw)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        steps: int = 16,
        guidance_scale: float | None = 9.0,
        seed: Seed = 0,
        temperature: tuple[float, float] = CONFIDENCE_TEMPERATURE,
        sampling: str = "multinomial",
        top_k: int = 0,
        guidance_schedule: str = "constant",
        guidance_plausibility: float = 0.0,
        images: Any = None,
        keep: Any = None,
        return_codes: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Text -> images ``np.uint8 [b, H, W, 3]`` (and the VQ codes ``[b, h, w]`` with
        ``return_codes``). ``guidance_scale=None`` disables CFG. ``temperature`` = (start, end)
        scale of the Gumbel noise on token confidences (annealed linearly; ``(0, 0)`` keeps the
        most likely tokens). ``sampling`` = how a masked code's candidate is drawn from its
        logits: ``"multinomial"`` (upstream), ``"argmax"``, or ``"top_k"`` (with ``top_k``).
        ``guidance_schedule="linear"`` ramps the scale from 0 at the first step to
        ``guidance_scale`` at the last (open-muse's schedule), ``"decay"`` from ``guidance_scale`` down
        to 1 (no guidance) at the last, ``"constant"`` keeps it. ``guidance_plausibility=a``
        (e.g. 0.1; 0 = off) lets guidance choose only among codes the conditional branch gives
        at least ``a`` times its top code's probability.

        Inpainting (completion): pass ``images [b, H, W, 3]`` and ``keep [b, h, w]`` bool over the
        VQ code grid; the codes of kept cells stay fixed and the others are generated.
        """
        prompts = _check_texts(prompts, "prompts")
        if (images is None) != (keep is None):
            raise ValueError("inpainting needs both images and keep (the code-grid mask to keep)")
        cfg = SamplerConfig(
            num_steps=_check_steps(steps), mask_id=self.config.mmdit.mask_token_id,
            vocab_limit=self.config.mmdit.codebook_size,
            temperature=_float_tuple(temperature, "temperature"),
            guidance_scale=None if guidance_scale is None else float(guidance_scale),
            timestep_mode=self.timestep_mode, sampling=sampling, top_k=int(top_k),
            guidance_schedule=guidance_schedule,
            guidance_plausibility=float(guidance_plausibility),
        )
        ids = self.tokenizer.encode(list(prompts), self.text_length)
        empty = self.tokenizer.encode([""] * len(prompts), self.text_length)
        args = (ids, empty, self._micro(len(prompts)))
        if images is None:
            images, codes = self._run("t2i", cfg, _keys(seed, len(prompts)), *args)
        else:
            pixels = _check_images(images, self.image_size)
            grid = self.image_size // self.config.vq.downsample_factor
            keep = np.asarray(keep, bool)
            if keep.shape != (len(prompts), grid, grid) or len(pixels) != len(prompts):
                raise ValueError(
                    f"keep must be [{len(prompts)}, {grid}, {grid}] (one code-grid mask per prompt) "
                    f"and images one per prompt; got keep {keep.shape}, {len(pixels)} images"
                )
            images, codes = self._run(
                "inpaint", cfg, _keys(seed, len(prompts)), *args, pixels, keep
            )
        images = np.asarray(jnp.round(images * 255.0)).astype(np.uint8)
        return (images, np.asarray(codes)) if return_codes else images

    def caption(
        self, images: Any, *, steps: int = 16, seed: Seed = 0, postprocess: bool = True,
        sampling: str = "multinomial", max_tokens: int | None = None,
    ) -> list[str]:
        """Images ``[b, H, W, 3]`` (uint8, or float in [0, 1]) -> captions. ``sampling``: how a
        masked token's candidate is drawn, ``"multinomial"`` (upstream) or ``"argmax"``;
        ``max_tokens``: see :meth:`text_tokens`."""
        n = len(_check_images(images, self.image_size))
        return self._image_to_text(images, [""] * n, steps, seed, postprocess, sampling,
                                   max_tokens)

    def answer(
        self,
        images: Any,
        questions: Sequence[str],
        *,
        steps: int = 16,
        seed: Seed = 0,
        postprocess: bool = True,
        sampling: str = "multinomial",
        max_tokens: int | None = None,
    ) -> list[str]:
        """VQA: the ``<bos> question`` prefix stays fixed, the rest is decoded (``sampling`` as
        in :meth:`caption`, ``max_tokens`` as in :meth:`text_tokens`)."""
        questions = _check_texts(questions, "questions")
        n = len(_check_images(images, self.image_size))
        if len(questions) != n:
            raise ValueError(f"got {n} images but {len(questions)} questions; pass one per image")
        return self._image_to_text(images, questions, steps, seed, postprocess, sampling,
                                   max_tokens)

    # -----------------------------------------------------------------------------------------
    # internals

    def _micro(self, b: int) -> np.ndarray:
        s = float(self.image_size)
        return np.tile(np.array([[s, s, 0.0, 0.0, DEFAULT_AESTHETIC]], np.float32), (b, 1))

    def _image_to_text(
        self, images: Any, questions: Sequence[str], steps: int, seed: Seed, postprocess: bool,
        sampling: str, max_tokens: int | None,
    ) -> list[str]:
        tokens, prefix = self.text_tokens(images, questions, steps=steps, seed=seed,
                                          sampling=sampling, max_tokens=max_tokens)
        eos, texts = self.tokenizer.eos_id, []
        for row, start in zip(tokens, prefix):
            gen = row[start:].tolist()
            gen = gen[: gen.index(eos)] if eos in gen else gen
            text = self.tokenizer.decode([gen])[0].strip()
            texts.append(clean_caption(text) if postprocess else text)
        return texts

    def text_tokens(
        self, images: Any, questions: Sequence[str], *, steps: int = 16, seed: Seed = 0,
        sampling: str = "multinomial", max_tokens: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """I2T/VQA decoding: ``(tokens [b, text_length], prefix_len [b])``; ``tokens[:, :prefix]``
        is ``<bos> question`` unchanged, the rest is generated.

        ``max_tokens``: decode only the first ``max_tokens`` positions after the prefix (the
        answer and its eos); the positions after them stay padding, shown to the model. ``None``
        decodes to ``text_length``, as upstream, which suits a model trained with the padding
        among its targets (``loss.text_pad_is_target=True``). A model trained without them
        never saw masked padding and runs on to the text length; a bound on the answer's length
        shows it the padding as in training (BENCHMARKS §1.22)."""
        if max_tokens is not None and int(max_tokens) < 1:
            raise ValueError(f"max_tokens={max_tokens}: use None (decode to the text length) "
                             "or at least 1 (the answer and its eos)")
        pixels = _check_images(images, self.image_size)
        tok = self.tokenizer
        ids = tok.encode(list(questions), self.text_length)
        prefix = _prefix_lengths(ids, tok.eos_id, tok.pad_id)
        if np.any(prefix > self.text_length - 2):
            raise ValueError(
                f"a question fills (nearly) all {self.text_length} text positions, leaving no room "
                "for the answer; shorten it or raise text_length"
            )
        pos = np.arange(self.text_length)[None, :]
        fixed = pos < prefix[:, None]
        if max_tokens is not None:  # the padding after the bound stays (ids are padded)
            fixed |= pos >= prefix[:, None] + int(max_tokens)
        # only ids the tokenizer can decode (the model's text vocab may be larger)
        cfg = SamplerConfig(num_steps=_check_steps(steps), mask_id=tok.mask_id,
                            vocab_limit=tok.vocab_size, timestep_mode=self.timestep_mode,
                            sampling=sampling)
        out = self._run("i2t", cfg, _keys(seed, len(ids)), pixels, ids, fixed, self._micro(len(ids)))
        return np.asarray(out), prefix

    def _run(self, task: str, cfg: SamplerConfig, rng: jax.Array, *batch: Any) -> Any:
        """Run the compiled ``task`` program on batch arrays (sharded over ``mesh`` if set)."""
        if self.mesh is not None:
            n = self.mesh.devices.size
            if len(batch[0]) % n:
                raise ValueError(
                    f"batch size {len(batch[0])} is not a multiple of the mesh's {n} devices; "
                    "pad the batch"
                )
            P = jax.sharding.PartitionSpec
            split = jax.sharding.NamedSharding(self.mesh, P(self.mesh.axis_names))
            batch = tuple(jax.device_put(x, split) for x in batch)
            rng = jax.device_put(
                rng, split if rng.ndim else jax.sharding.NamedSharding(self.mesh, P())
            )
        return self._program(task, cfg)(self.params, rng, *batch)

    def _program(self, task: str, cfg: SamplerConfig) -> Callable:
        key = (task, cfg)
        if key not in self._programs:
            if task == "i2t":
                program = self._i2t_program(cfg)
            else:
                program = self._t2i_program(cfg, inpaint=task == "inpaint")
            self._programs[key] = jax.jit(program)
        return self._programs[key]

    def _t2i_program(self, cfg: SamplerConfig, inpaint: bool) -> Callable:
        muddit, vq = self.muddit, self.vq
        grid = self.image_size // self.config.vq.downsample_factor

        def logits_fn(context: Any, tokens: jax.Array, t: jax.Array) -> jax.Array:
            p, ctx, pooled, micro, keys = context
            logits, _ = muddit.apply(  # every row has masked tokens left to predict
                {"params": p}, tokens.reshape(-1, grid, grid), ctx, pooled, t, micro, keys,
                tokens.shape[0], method=Muddit.denoise,
            )
            return logits.reshape(tokens.shape[0], grid * grid, -1)

        def program(params, rng, ids, empty_ids, micro, pixels=None, keep=None):
            p = {"text_encoder": params["text_encoder"], "mmdit": params["mmdit"]}
            b = ids.shape[0]
            text = jnp.concatenate([ids, empty_ids]) if cfg.guidance_scale is not None else ids
            ctx, pooled = muddit.apply({"params": p}, text, method=Muddit.encode_text)
            micro = jnp.concatenate([micro, micro]) if cfg.guidance_scale is not None else micro
            tokens = jnp.zeros((b, grid * grid), jnp.int32)
            fixed = jnp.zeros_like(tokens, bool)
            if inpaint:
                tokens = vq.apply({"params": params["vq"]}, pixels, method=VQModel.encode)
                tokens, fixed = tokens.reshape(b, -1), keep.reshape(b, -1)
            keys = text_keys(self.config, text)
            codes = sample(logits_fn, (p, ctx, pooled, micro, keys), tokens, fixed, rng, cfg)
            codes = codes.reshape(b, grid, grid)
            images = vq.apply({"params": params["vq"]}, codes, method=VQModel.decode)
            return jnp.clip(images.astype(jnp.float32), 0.0, 1.0), codes

        return program

    def _i2t_program(self, cfg: SamplerConfig) -> Callable:
        muddit, vq = self.muddit, self.vq

        def logits_fn(context: Any, tokens: jax.Array, t: jax.Array) -> jax.Array:
            p, codes, micro = context
            _, text_logits = muddit.apply({"params": p}, codes, tokens, t, micro,
                                          generated_rows=0)  # every image is a clean condition
            return text_logits

        def program(params, rng, pixels, ids, fixed, micro):
            p = {"text_encoder": params["text_encoder"], "mmdit": params["mmdit"]}
            codes = vq.apply({"params": params["vq"]}, pixels, method=VQModel.encode)
            return sample(logits_fn, (p, codes, micro), ids, fixed, rng, cfg)

        if self.config.mmdit.tokenizer_vocab_size is None:
            raise ValueError("this MM-DiT has no text decoder head (tokenizer_vocab_size=None)")
        return program


# ---------------------------------------------------------------------------------------------
# input checks


def _keys(seed: Seed, b: int) -> jax.Array:
    """One key for the batch (``int`` seed) or one key per example (a sequence of ``b`` seeds:
    each example then samples the same whatever batch or device it is decoded in)."""
    if isinstance(seed, (int, np.integer)):
        return jax.random.key(int(seed))
    seeds = np.asarray(list(seed), np.uint32)
    if seeds.shape != (b,):
        raise ValueError(f"seed must be an int or one int per example ({b}), got {seeds.shape}")
    return jax.vmap(jax.random.key)(seeds)


def _check_texts(texts: Any, field: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{field} must be a list of strings, not a single string; wrap it in [...]")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{field} is empty; pass at least one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{field}[{bad[0]}] is not a string")
    return texts


def _check_steps(steps: int) -> int:
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return int(steps)


def _float_tuple(values: Any, field: str) -> tuple[float, ...]:
    """``values`` (any sequence of numbers) as a hashable tuple of floats for
    :class:`SamplerConfig`, which checks their count and range."""
    try:
        return tuple(float(x) for x in values)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a sequence of numbers such as (2.0, 0.0); "
                         f"got {values!r}") from None


def _check_images(images: Any, size: int) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images must be [b, {size}, {size}, 3] (the pipeline's image_size), got {x.shape}; "
            "resize them first"
        )
    if x.shape[0] == 0:
        raise ValueError("images is empty; pass at least one image")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    return x.astype(np.float32)


def _prefix_lengths(ids: np.ndarray, eos_id: int, pad_id: int) -> np.ndarray:
    """Length of ``<bos> text`` per row (everything before the first eos / pad after bos)."""
    stop = (ids == eos_id) | (ids == pad_id)
    stop[:, 0] = False
    return np.where(stop.any(1), stop.argmax(1), ids.shape[1]).astype(np.int32)


def init_params(config: MudditConfig, image_size: int, text_length: int, key: jax.Array
                ) -> dict[str, Any]:
    """Freshly initialised (unboxed) ``text_encoder`` / ``mmdit`` / ``vq`` params of ``config``'s
    networks for ``image_size`` images and ``text_length`` text tokens."""
    k_m, k_v = jax.random.split(key)
    grid = image_size // config.vq.downsample_factor
    muddit = Muddit(config).init(
        k_m, jnp.zeros((1, grid, grid), jnp.int32), jnp.zeros((1, text_length), jnp.int32),
        jnp.zeros((1,)), jnp.zeros((1, 5)))
    vq = VQModel(config.vq).init(k_v, jnp.zeros((1, image_size, image_size, 3)))
    return dict(nn.unbox(muddit)["params"], vq=nn.unbox(vq)["params"])


def check_params(config: MudditConfig, params: Mapping[str, Any], image_size: int,
                 text_length: int) -> None:
    """Raise if ``params`` (``text_encoder`` / ``mmdit`` / ``vq``) are not the parameters of
    ``config``'s networks: missing or unexpected arrays, or other shapes. Flax would ignore
    unexpected ones, so a config without an option the params were trained with (e.g.
    ``model.conv_blocks``) would otherwise run a different network without a word."""
    from muddit_jax.port.mapping import flatten

    abstract = jax.eval_shape(
        lambda: init_params(config, image_size, text_length, jax.random.key(0)))
    want = {k: v.shape for k, v in flatten(abstract).items()}
    got = {k: np.shape(v) for k, v in flatten({k: params[k] for k in abstract if k in params}
                                              ).items()}
    problems = [f"missing {'/'.join(k)}" for k in want if k not in got]
    problems += [f"unexpected {'/'.join(k)}" for k in got if k not in want]
    problems += [f"{'/'.join(k)} has shape {got[k]}, the config's model needs {want[k]}"
                 for k in want if k in got and tuple(got[k]) != tuple(want[k])]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            "the params do not fit the model config: " + "; ".join(problems[:5]) + more +
            ". Use the config the params were trained or converted with (the same --config "
            "file and --config.model.* overrides)")
