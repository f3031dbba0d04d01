"""Write the online backbone of a train.py checkpoint as a plain state_dict.

    python -m smog_train.export runs/demo/checkpoint.pth backbone.pth

resnet18/34/50 and wide_resnet50_2 load into torchvision's model (strict=False; only the classifier
is missing); resnet50w2 and swin_t into smog_train.backbones.build_backbone(name)[0] (strict=True).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from smog_train.checkpoint import load_checkpoint, save_atomic


def export_backbone(checkpoint: str, out: str) -> dict:
    """The `backbone.` entries of a train.py checkpoint, without the prefix, written atomically."""
    ck = load_checkpoint(checkpoint)
    if "model" not in ck:
        raise ValueError(f"{checkpoint!r} is not a train.py checkpoint (no 'model' entry)")
    sd = {k[len("backbone.") :]: v for k, v in ck["model"].items() if k.startswith("backbone.")}
    save_atomic(sd, out)
    return sd


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m smog_train.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("checkpoint", help="a train.py checkpoint (out_dir/checkpoint.pth)")
    ap.add_argument("out", help="where to write the backbone's state_dict")
    args = ap.parse_args(argv)
    try:
        sd = export_backbone(args.checkpoint, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(sd)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
