"""Pictures of SMoG's groups: for the most populated groups of one head, the training images nearest
each group feature, one row per group.

    python tools/gallery.py --checkpoint runs/demo/checkpoint.pth --out groups.png
    python tools/gallery.py --checkpoint runs/demo/checkpoint.pth --head 1 --groups 10 --per-group 12 --out h1.png

How to read it: row r shows group c_r of head --head; rows are sorted by population, i.e. the number
of training images whose nearest group (argmax of cosine, as in the target assignment of METHOD.md)
is c_r, written at the left of the row ("#k n=P": group index k, population P). The tiles of a row
are the --per-group training images whose embedding has the highest cosine with c_r, most similar
first. Embeddings are those of the memory bank: the online backbone + projector, L2-normalised,
here in eval mode on the un-augmented training images. A group that "means" something shows
images that share it (on the built-in data: the same shape, whatever its colour, size or position).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # a checkout, not installed
import smog
from smog_train import backbones, checkpoint, data

LABEL_WIDTH = 72  # px of the label strip at the left of each row
PAD = 2  # make_grid padding between tiles (px)


def load_model(path: str) -> tuple:
    """-> (SMoG in eval mode with the checkpoint's weights and groups, the train.py config dict).
    The architecture comes from the checkpoint's stored config; the format tag is not checked here (any
    train.py checkpoint with 'model' and 'config' entries is accepted)."""
    ck = checkpoint.load_checkpoint(path)
    cfg = ck.get("config")
    if (
        not isinstance(ck.get("model"), dict)
        or not isinstance(cfg, dict)
        or not isinstance(cfg.get("model"), dict)
    ):
        raise ValueError(
            f"{path!r} is not a train.py checkpoint (it needs 'model' and 'config' entries, and the "
            f"config a 'model' section); an exported backbone has no groups to draw"
        )
    model = backbones.build_smog(smog.SMoGConfig.from_dict(cfg["model"]))
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{path!r}: the weights do not match the architecture in its config "
            f"({str(e).splitlines()[0][:160]})"
        ) from None
    return model.eval(), cfg


@torch.no_grad()
def embed_dataset(model: smog.SMoG, ds, device, batch_size: int = 256) -> torch.Tensor:
    """Normalised online projector embeddings of every item of ds, in dataset order -> [N, D] fp32 (CPU)."""
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    return torch.cat([model.embed(x.to(device)).cpu() for x, _ in dl])


def choose(z: torch.Tensor, groups: torch.Tensor, n_groups: int, per_group: int) -> tuple:
    """z [N, D] and groups [K, D], both unit rows. -> (chosen groups [n], their populations [n],
    nearest images [n, m]): the n groups with the most images assigned (ties: lower index first) and,
    for each, the m images of highest cosine with the group feature (ties: lower index first)."""
    pop = torch.bincount(smog.assign_groups(z, groups), minlength=groups.shape[0])  # [K]
    chosen = torch.sort(-pop, stable=True).indices[:n_groups]  # [n]
    sims = groups[chosen] @ z.T  # [n, N]
    nearest = torch.sort(-sims, dim=1, stable=True).indices[:, :per_group]  # [n, m]
    return chosen, pop[chosen], nearest


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of data.eval_transform's Normalize: [..., 3, h, w] -> pixels in [0, 1]."""
    mean = torch.tensor(data.MEAN).view(3, 1, 1)
    std = torch.tensor(data.STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def draw(ds, chosen, pops, nearest, out: str) -> tuple:
    """Write the PNG (atomically) -> its (width, height)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    n, m = nearest.shape
    tiles = torch.stack([unnormalize(ds[int(i)][0]) for i in nearest.flatten()])  # [n*m, 3, h, w]
    grid = make_grid(tiles, nrow=m, padding=PAD, pad_value=1.0)  # [3, H, W]
    # to uint8 exactly as torchvision.utils.save_image rounds
    arr = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    body = Image.fromarray(arr)
    img = Image.new("RGB", (LABEL_WIDTH + body.width, body.height), "white")
    img.paste(body, (LABEL_WIDTH, 0))
    pen = ImageDraw.Draw(img)
    row_h = tiles.shape[-2] + PAD
    for r, (c, p) in enumerate(zip(chosen.tolist(), pops.tolist())):
        y = PAD + r * row_h
        pen.text((3, y), f"#{c}", fill="black")
        pen.text((3, y + min(12, row_h // 2)), f"n={p}", fill="black")
    tmp = f"{out}.tmp-{os.getpid()}.png"
    try:
        img.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return img.size


def gallery(
    checkpoint: str,
    out: str,
    *,
    data_spec: Optional[str] = None,
    data_root: Optional[str] = None,
    head: int = 0,
    n_groups: int = 8,
    per_group: int = 10,
    device: str = "cpu",
    batch_size: int = 256,
) -> dict:
    """Embed the training set, choose groups and images (see `choose`), write the PNG.
    -> dict(groups [n], populations [n], indices [n, m] (training-set indices, row-major as drawn), size (W, H)).
    ValueError (one line) on bad input, before anything is written."""
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out {out!r} must end in .png")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise ValueError(f"cannot write {out!r}: {d!r} is not a writable directory")
    if n_groups < 1 or per_group < 1:
        raise ValueError(
            f"--groups and --per-group must be at least 1 (got {n_groups}, {per_group})"
        )
    model, cfg = load_model(checkpoint)
    H, K = model.groups.shape[:2]
    if not 0 <= head < H:
        raise ValueError(
            f"--head {head} is out of range: the checkpoint has {H} heads (0..{H - 1})"
        )
    if n_groups > K:
        raise ValueError(
            f"--groups {n_groups} is more than the {K} groups per head in the checkpoint"
        )
    spec = data_spec or cfg.get("data") or "demo"
    image_size = cfg.get("image_size") or data.dataset_image_size(spec)
    ds = data.build_dataset(
        spec,
        "train",
        data.eval_transform(image_size),
        root=data_root or cfg.get("data_root") or "data",
    )
    if per_group > len(ds):
        raise ValueError(
            f"--per-group {per_group} is more than the {len(ds)} training images of {spec}"
        )
    dev = torch.device(device)
    model.to(dev)
    z = embed_dataset(model, ds, dev, batch_size)  # [N, D]
    groups = F.normalize(model.groups[head].float().cpu(), dim=-1)  # [K, D]
    chosen, pops, nearest = choose(z, groups, n_groups, per_group)
    size = draw(ds, chosen, pops, nearest, out)
    return dict(
        groups=chosen, populations=pops, indices=nearest, size=size, n_train=len(ds), data=spec
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gallery.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--checkpoint", required=True, help="a train.py checkpoint (out_dir/checkpoint.pth)"
    )
    ap.add_argument(
        "--data", default=None, help="training set to draw from (default: the checkpoint's --data)"
    )
    ap.add_argument(
        "--data-root",
        default=None,
        help="where cifar10/cifar100/stl10 live (default: the checkpoint's)",
    )
    ap.add_argument(
        "--head", type=int, default=0, help="which head's groups (default: %(default)s)"
    )
    ap.add_argument(
        "--groups",
        type=int,
        default=8,
        help="rows: the most populated groups (default: %(default)s)",
    )
    ap.add_argument(
        "--per-group", type=int, default=10, help="images per row (default: %(default)s)"
    )
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        r = gallery(
            args.checkpoint,
            args.out,
            data_spec=args.data,
            data_root=args.data_root,
            head=args.head,
            n_groups=args.groups,
            per_group=args.per_group,
            device=args.device,
        )
    except (ValueError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out} ({r['size'][0]}x{r['size'][1]} px): head {args.head}, {len(r['groups'])} groups of "
        f"{r['data']} ({r['n_train']} training images), populations {r['populations'].tolist()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
