"""``muddit-pretokenize``: build a dataset, train a tokenizer on it, or pre-encode it to VQ codes.

Modes (one per call):

* default: encode every image of ``--split`` with the VQ (``--vq`` = a ``muddit-convert`` output
  folder, a converted ``vqvae`` component folder, or ``random-tiny``) and write codes + token ids
  to ``--out`` (see :mod:`muddit_jax.data.pretokenize`; resumable, host-sharded);
* ``--train-tokenizer``: train a SentencePiece model on the split's captions / questions and
  write ``--out``/tokenizer.model;
* ``--prepare-only``: build the TFDS dataset into ``--data-dir`` and stop (do this once before a
  multi-host run).

The tokenizer is ``--tokenizer``, else the ``tokenizer/`` folder of a converted pipeline
``--vq``, else ``--out``/tokenizer.model.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from muddit_jax.data import registry

RANDOM_TINY = "random-tiny"


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value when it parses as one (``num_train=64``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muddit-pretokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=list(registry.BUILDERS))
    p.add_argument("--split", default="train")
    p.add_argument("--out", help="output folder (pre-tokenized dataset / tokenizer.model)")
    p.add_argument("--vq", help=f"converted VQ folder or {RANDOM_TINY!r}")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default $MUDDIT_DATA_DIR "
                   "or ~/muddit_data)")
    p.add_argument("--source-dir", help="raw files of coco_captions / vqav2 / image_folder")
    p.add_argument("--config", help="builder config, e.g. 2014 / 2017 / karpathy for COCO")
    p.add_argument("--option", action="append", type=parse_option, default=[],
                   metavar="KEY=VALUE", help="extra builder option (repeatable)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--text-length", type=int, default=32)
    p.add_argument("--tokenizer", help="SentencePiece .model or CLIP tokenizer folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--examples-per-shard", type=int, default=1024)
    p.add_argument("--process-index", type=int, default=None)
    p.add_argument("--process-count", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="init seed of the random-tiny VQ")
    p.add_argument("--train-tokenizer", action="store_true")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--prepare-only", action="store_true")
    return p


@functools.lru_cache(maxsize=4)
def random_tiny_vq(seed: int) -> tuple[Any, Any]:
    """The VQ of ``MudditConfig.tiny`` with random params (cached: its init takes seconds)."""
    import flax.linen as nn
    import jax

    from muddit_jax.models import vq
    from muddit_jax.models.muddit import MudditConfig

    config = MudditConfig.tiny(64).vq
    return config, nn.unbox(vq.init_params(config, jax.random.PRNGKey(seed)))["params"]


def load_vq(spec: str, seed: int) -> tuple[Any, Any]:
    """``(VQConfig, params)`` of a converted folder / component, or a random-init tiny VQ."""
    if spec == RANDOM_TINY:
        return random_tiny_vq(seed)
    from muddit_jax.port.convert import MANIFEST, load_component, load_converted

    path = Path(spec).expanduser()
    if (path / MANIFEST).is_file():
        components = load_converted(path)
        if "vqvae" not in components:
            raise SystemExit(f"muddit-pretokenize: {path} has no vqvae component")
        return components["vqvae"]
    if (path / "config.json").is_file():
        name, config, params = load_component(path)
        if name != "vqvae":
            raise SystemExit(f"muddit-pretokenize: {path} is a {name}, not a vqvae")
        return config, params
    raise SystemExit(f"muddit-pretokenize: --vq {spec} is neither {RANDOM_TINY!r} nor a "
                     "muddit-convert output / vqvae folder")


def find_tokenizer(args: argparse.Namespace) -> Any:
    from muddit_jax.models.tokenizers import load_tokenizer

    candidates = [args.tokenizer] if args.tokenizer else []
    if args.vq and args.vq != RANDOM_TINY:
        candidates.append(Path(args.vq) / "tokenizer")
    if args.out:
        candidates.append(Path(args.out) / "tokenizer.model")
    for c in candidates:
        if Path(c).exists():
            return load_tokenizer(c)
    raise SystemExit("muddit-pretokenize: no tokenizer; pass --tokenizer, or run with "
                     "--train-tokenizer first (writes --out/tokenizer.model)")


def main(argv: list[str] | None = None) -> int:
    from muddit_jax.data.pipeline import DataConfig

    args = build_parser().parse_args(argv)
    options = dict(args.option)
    for key in ("source_dir", "config"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    data = DataConfig(dataset=args.dataset, split=args.split, data_dir=args.data_dir,
                      options=options, resolution=args.resolution, text_length=args.text_length)
    options = data.source_options()
    if args.prepare_only:
        builder = registry.prepare(args.dataset, args.data_dir, **options)
        print(f"muddit-pretokenize: {args.dataset} ready at {builder.data_dir}: "
              f"{ {k: v.num_examples for k, v in builder.info.splits.items()} }")
        return 0
    if not args.out:
        raise SystemExit("muddit-pretokenize: --out is required")
    source = registry.data_source(args.dataset, args.split, args.data_dir, **options)
    if args.train_tokenizer:
        from muddit_jax.data.text import dataset_texts, train_tokenizer

        path = Path(args.out) / "tokenizer.model"
        tok = train_tokenizer(dataset_texts([source]), args.vocab_size, path)
        print(f"muddit-pretokenize: wrote {path} ({tok.vocab_size} pieces)")
        return 0
    if not args.vq:
        raise SystemExit("muddit-pretokenize: --vq is required to pre-tokenize")
    from muddit_jax.data import pretokenize as pt
    from muddit_jax.data.text import fingerprint

    tokenizer = find_tokenizer(args)
    vq_config, vq_params = load_vq(args.vq, args.seed)
    if args.resolution % vq_config.downsample_factor:
        raise SystemExit(f"muddit-pretokenize: --resolution {args.resolution} is not a multiple "
                         f"of the VQ downsample factor {vq_config.downsample_factor}")
    grid = args.resolution // vq_config.downsample_factor
    job = pt.Job(args.dataset, options, args.resolution, args.text_length,
                 fingerprint(tokenizer), pt.vq_fingerprint(vq_config, vq_params), (grid, grid),
                 args.examples_per_shard)
    encode = pt.make_encoder(vq_config, vq_params, args.batch_size)
    summary = pt.pretokenize(source, args.split, args.out, job, encode, tokenizer,
                             batch_size=args.batch_size, process_index=args.process_index,
                             process_count=args.process_count)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
