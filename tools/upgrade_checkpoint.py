"""Convert a trusted checkpoint that ovd refuses to load (it needs full unpickling) into the safe format.

ovd loads checkpoints with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers only. A file of an earlier layout holding numpy values is refused by that loader; if you
trust where it came from:

    python tools/upgrade_checkpoint.py --trust old.pth new.pth

This reads ``old.pth`` admitting only numpy array / scalar / dtype constructors besides (nothing in the
file runs; a file naming any other object is refused), turns numpy values into tensors / numbers, and
writes ``new.pth``, which loads with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import sys

from ovd.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the checkpoint to convert")
    p.add_argument("dst", help="where to write the converted checkpoint")
    p.add_argument("--trust", action="store_true", help="required: I trust where SRC came from")
    args = p.parse_args(argv)
    if not args.trust:
        p.error("pass --trust if you trust where SRC came from")
    from ovd.engine.checkpoint import upgrade_checkpoint

    changed = upgrade_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}" + (f" (converted: {', '.join(changed[:5])})" if changed else " (already plain)"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
