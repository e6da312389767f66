"""``muddit-convert``: PyTorch (diffusers / transformers / Muddit) checkpoint -> orbax + JSON."""

from __future__ import annotations

import argparse
import sys

from muddit_jax.port.convert import COMPONENTS, convert
from muddit_jax.port.mapping import PortError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muddit-convert", description=__doc__)
    parser.add_argument("--src", required=True, help="component folder, pipeline folder or weights file")
    parser.add_argument("--dst", required=True, help="output folder (must not exist)")
    parser.add_argument("--component", choices=sorted(COMPONENTS), help="force the component type")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    args = parser.parse_args(argv)
    try:
        names = convert(args.src, args.dst, component=args.component, overwrite=args.overwrite)
    except PortError as e:
        print(f"muddit-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"muddit-convert: wrote {', '.join(names)} to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
