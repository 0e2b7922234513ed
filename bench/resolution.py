"""``dfkd select`` at a user's resolution, as whole processes: against the teacher's raw forward
and against the way the papers' own scripts score a pool (a torchvision DataLoader loop).

For each input size (``--sizes``, default 224 and 112) three kinds of process run on the same
JPEG pool, one after another, ``--repeats`` times interleaved:

* **raw**: loads the teacher and forwards the pool's images, already decoded and resized into a
  uint8 tensor file, in batches (normalised on the device, ``inference_mode``, channels_last,
  bf16 autocast on CUDA as select);
* **loader**: the official DFND script's way: ``torchvision.datasets.ImageFolder`` with
  ``Resize(S)``, ``CenterCrop(S)``, ``ToTensor()``, ``Normalize``, a ``DataLoader`` with the
  same batch and workers, ``torch.no_grad`` and the noise value of every image (fp32, as the
  script);
* **select**: ``dfkd select --teacher CARD --pool POOL --num-images N/10`` (listing, decoding,
  scoring, the second look at the candidates, the files).

Each is timed from its start to its exit (Python start-up, imports and model load included, the
same for all three), and its peak private memory is sampled every 20 ms from
``/proc/PID/status`` (``RssAnon``: memory that is the process's own, page cache excluded), over
the process and its children. Ratios are images/s over the raw process's images/s in the same
repeat (medians over repeats). The teacher is a torchvision model with random weights (speed
needs no training), ImageNet mean/std, ``resize: crop``.

Pools, offline: ``--jpeg 500x375`` (default) writes smooth-noise JPEGs of that size (quality
90), ``--photos`` crops real photographs from Debian's wallpaper packages
(``gnome-backgrounds``, ``plasma-workspace-wallpapers``) to that size; ``--large K`` adds K
images of 2000×1500 to the pool.

    python bench/resolution.py --arch torchvision:resnet18 --num 800
    python bench/resolution.py --arch torchvision:resnet50 --num 400 --sizes 224
    python bench/resolution.py --pool data/demo/wild --arch resnet20 --input 1x28x28 --num 4000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, jpeg_pool, measure, photo_pool, random_card  # noqa: E402

IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="torchvision:resnet18", help="teacher arch (random weights)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--sizes", default="224,112", help="comma-separated input sizes S (S×S, 3 channels)")
    p.add_argument("--input", help="CxHxW instead of --sizes (e.g. 1x28x28 for the demo pool; stretch resize)")
    p.add_argument("--num", type=int, default=800, help="pool images")
    p.add_argument("--jpeg", default="500x375", help="size of the generated JPEGs (WxH)")
    p.add_argument("--photos", action="store_true", help="crop Debian wallpapers instead of generating noise")
    p.add_argument("--large", type=int, default=0, help="also this many 2000x1500 JPEGs")
    p.add_argument("--pool", help="an existing pool folder instead (its images are taken as they are)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: dfkd's for the device)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", help="folder for the pool and runs (default: a temporary one, removed)")
    p.add_argument("--child", choices=("raw", "loader"), help=argparse.SUPPRESS)
    p.add_argument("--card", help=argparse.SUPPRESS)
    p.add_argument("--tensor", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the child processes --------------------------------------------------------------------

def child_raw(args) -> None:
    from dfkd.cards import load_card, load_model
    from dfkd.runtime import autocast, resolve_device

    card, dev = load_card(args.card), resolve_device("auto")
    model = load_model(card, dev).to(memory_format=torch.channels_last)
    images = torch.load(args.tensor)
    mean = torch.tensor(card.input.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(card.input.std, device=dev).view(1, -1, 1, 1)
    with torch.inference_mode(), autocast(dev, dev.type == "cuda"):  # as select: bf16 autocast on CUDA
        for i in range(0, len(images), args.batch_size):
            x = (images[i:i + args.batch_size].to(dev, non_blocking=True).float().div_(255) - mean) / std
            torch.softmax(model(x.contiguous(memory_format=torch.channels_last)).float(), 1).max(1).values.cpu()


def child_loader(args) -> None:
    """The official DFND script's scoring loop (ImageFolder + DataLoader + model)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from dfkd.cards import load_card, load_model
    from dfkd.runtime import resolve_device

    card, dev = load_card(args.card), resolve_device("auto")
    model = load_model(card, dev)
    size = card.input.size
    gray = [T.Grayscale()] if card.input.channels == 1 else []
    tf = T.Compose([*gray, T.Resize(size[0] if card.input.resize == "crop" else size), T.CenterCrop(size),
                    T.ToTensor(), T.Normalize(card.input.mean, card.input.std)])
    data = torch.utils.data.DataLoader(ImageFolder(args.pool, tf), batch_size=args.batch_size,
                                       num_workers=args.workers, shuffle=False)
    noise = []
    with torch.no_grad():
        for x, _ in data:
            noise.append(-torch.log_softmax(model(x.to(dev)), 1).max(1).values.cpu())


# --- the parent -------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse(argv)
    if args.child == "raw":
        return child_raw(args)
    if args.child == "loader":
        return child_loader(args)
    from dfkd.images import InputSpec, open_pool
    from dfkd.runtime import default_workers, resolve_device
    from dfkd.train.data import decode_images

    dev = resolve_device("auto")
    workers = default_workers(dev) if args.workers is None else args.workers
    work = Path(args.work or tempfile.mkdtemp(prefix="dfkd-bench-resolution-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.pool:
        pool, source = Path(args.pool), args.pool
    else:
        pool = work / "pool"
        w, h = (int(v) for v in args.jpeg.lower().split("x"))
        if not (pool / "all").is_dir():
            (photo_pool if args.photos else jpeg_pool)(pool / "all", args.num, w, h)
            if args.large:
                (photo_pool if args.photos else jpeg_pool)(pool / "all", args.large, 2000, 1500, prefix="large")
        source = (f"{args.num} {'wallpaper crops' if args.photos else 'generated smooth-noise JPEGs'} of {args.jpeg}"
                  + (f" + {args.large} of 2000x1500" if args.large else ""))
    paths = open_pool(pool).paths
    if args.input:
        c, h, w = (int(v) for v in args.input.lower().split("x"))
        specs = [InputSpec(size=(h, w), channels=c, mean=[0.5] * c, std=[0.5] * c, resize="stretch")]
    else:
        specs = [InputSpec(size=(s, s), channels=3, resize="crop", **IMAGENET) for s in
                 (int(v) for v in args.sizes.split(","))]
    header("select at a user's resolution, whole processes", dev, dev.type == "cuda", {
        "teacher": f"{args.arch}, random weights, {args.classes} classes", "pool": f"{source} ({len(paths)} images)",
        "batch": args.batch_size, "workers": workers,
        "reduced JPEG decoding": "off (DFKD_REDUCED_DECODE=0)" if os.environ.get("DFKD_REDUCED_DECODE") == "0"
        else "on"})
    py = sys.executable
    me = str(Path(__file__).resolve())
    print(f"  {'input':<10} {'process':<8} {'img/s':>8} {'vs raw':>7} {'vs loader':>9} {'peak private':>13}")
    for spec in specs:
        name = f"{spec.channels}x{spec.size[0]}x{spec.size[1]}"
        card = random_card(work, args.arch, spec=spec, classes=args.classes)
        tensor = work / f"images-{name}.pt"
        torch.save(decode_images(paths, spec, batch_size=args.batch_size, workers=workers).images, tensor)
        cmds = {
            "raw": [py, me, "--child", "raw", "--card", str(card), "--tensor", str(tensor),
                    "--batch-size", str(args.batch_size)],
            "loader": [py, me, "--child", "loader", "--card", str(card), "--pool", str(pool),
                       "--batch-size", str(args.batch_size), "--workers", str(workers)],
            "select": [py, "-m", "dfkd", "select", "--teacher", str(card), "--pool", str(pool),
                       "--num-images", str(max(1, len(paths) // 10)), "--batch-size", str(args.batch_size),
                       "--workers", str(workers), "--out", ""],
        }
        got: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
        for rep in range(args.repeats):
            for kind, cmd in cmds.items():
                if kind == "select":
                    cmd = cmd[:-1] + [str(work / f"select-{name}-{rep}")]
                got[kind].append(measure(cmd))
        rate = {k: [len(paths) / wall for wall, _ in v] for k, v in got.items()}
        for kind in cmds:
            vs_raw = statistics.median(r / b for r, b in zip(rate[kind], rate["raw"]))
            vs_loader = statistics.median(r / b for r, b in zip(rate[kind], rate["loader"]))
            peak = max(p for _, p in got[kind]) / 2**20
            print(f"  {name:<10} {kind:<8} {statistics.median(rate[kind]):8.1f} {vs_raw:7.2f} {vs_loader:9.2f}"
                  f" {peak:10.0f} MiB")
        print(f"RATIO {name} select / raw = {statistics.median(s / r for s, r in zip(rate['select'], rate['raw'])):.2f}"
              f"  select / loader = {statistics.median(s / r for s, r in zip(rate['select'], rate['loader'])):.2f}")
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
