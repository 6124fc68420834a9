"""Convert a trusted checkpoint that ovd refuses to load (it needs full unpickling) into the safe format.

ovd loads checkpoints with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers only. A file holding other objects (numpy arrays, config objects, anything a ``__reduce__``
can name) is refused, because unpickling it may run code. If you trust where the file came from:

    python tools/upgrade_checkpoint.py --trust old.pth new.pth

This unpickles ``old.pth`` fully (running whatever code it holds), turns numpy values into tensors /
numbers and config objects into YAML text, and writes ``new.pth``, which loads safely.
"""

from __future__ import annotations

import argparse
import sys

from ovd.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the checkpoint to convert")
    p.add_argument("dst", help="where to write the converted checkpoint")
    p.add_argument("--trust", action="store_true", help="required: I trust SRC (unpickling it may run code)")
    args = p.parse_args(argv)
    if not args.trust:
        p.error("converting unpickles SRC, which may run code: pass --trust if you trust its source")
    from ovd.engine.checkpoint import upgrade_checkpoint

    changed = upgrade_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}" + (f" (converted: {', '.join(changed[:5])})" if changed else " (already plain)"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
