"""How close ``dfkd select`` runs to the teacher's raw forward speed on the same images.

Baseline (measured in this run): the teacher's forward over the same images already decoded
into a uint8 tensor in memory, normalised on the device, under ``torch.inference_mode``, with
the batch size, autocast and channels_last that select uses on that device (logits are not
copied back; on CUDA the tensor is pinned and the window synchronised at both ends). It is
measured again before and after each run below, and each ratio uses the two beside it, so a
machine that gets busier or quieter shifts both alike. Measured:

* ``select_pool`` end to end (open the pool, fingerprint, decode PNGs in ``--workers``
  processes, forward, score, write scores/selected/skipped.tsv and the manifest) for each
  ``--workers`` value, ``--repeats`` times interleaved, as the median images/s and the median
  ratio to the raw forward;
* the scoring engine alone (``dfkd.engine.stream``: decode + forward + per-row scores, no files) and ``decode_images`` alone,
  at the default worker count, to tell the loader's cost from select's own.

On CUDA each select run and the engine are measured twice, JPEGs decoded on the GPU
(``dfkd/gpu_decode.py``) and with ``DFKD_GPU_DECODE=0`` (PIL in the workers): ``--decode``.
A JPEG pool at a teacher's resolution, without a trained teacher or a dataset::

    python bench/select_throughput.py --device cuda --arch torchvision:resnet50 --input 3x224x224 \
        --classes 1000 --jpeg 500x375 --num 8192

    python bench/select_throughput.py [--teacher CARD] [--pool DIR|INDEX] [--num 4000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuShare, fmt_rate, header, jpeg_pool, pool_index, random_card, raw_forward, timer  # noqa: E402

from dfkd.cards import load_card, load_model  # noqa: E402
from dfkd.images import InputSpec, open_pool  # noqa: E402
from dfkd.engine import stream  # noqa: E402
from dfkd.dist import SINGLE  # noqa: E402
from dfkd.runtime import Runtime, default_workers, resolve_device  # noqa: E402
from dfkd.select.run import select_pool  # noqa: E402
from dfkd.train.data import decode_images  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="model card (default: random-weight --arch card at --input)")
    p.add_argument("--arch", default="resnet20",
                   help="arch of the random teacher (e.g. resnet8x4, torchvision:resnet50, timm:...)")
    p.add_argument("--input", default="1x28x28", help="CxHxW of the random teacher (crop resize when 3 channels)")
    p.add_argument("--classes", type=int, default=10, help="classes of the random teacher")
    p.add_argument("--pool", help="pool directory or index (default: data/demo/wild, else generated PNGs)")
    p.add_argument("--jpeg", metavar="WxH", help="pool of --num generated RGB JPEGs of this size instead")
    p.add_argument("--decode", help="comma-separated: gpu (JPEGs decoded on CUDA), cpu (DFKD_GPU_DECODE=0);"
                                    " default gpu,cpu on CUDA, cpu elsewhere")
    p.add_argument("--num", type=int, default=4000, help="images taken from the pool (spread evenly)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: as select, on for CUDA only)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to try")
    p.add_argument("--repeats", type=int, default=2,
                   help="select runs per worker count, interleaved (medians are shown)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds; no new repeat starts after this (a busy machine still ends in time)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    dev = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = dev.type == "cuda" if args.amp is None else args.amp
    workers_list = [int(w) for w in args.workers.split(",") if w.strip()]
    decodes = [d.strip() for d in (args.decode or ("gpu,cpu" if dev.type == "cuda" else "cpu")).split(",")]
    if set(decodes) - {"gpu", "cpu"} or ("gpu" in decodes and dev.type != "cuda"):
        sys.exit(f"--decode {args.decode}: gpu and/or cpu, and gpu only on a CUDA device")
    tmp = Path(tempfile.mkdtemp(prefix="dfkd-bench-select-"))
    try:
        c, h, w = (int(v) for v in args.input.lower().split("x"))
        spec = InputSpec(size=(h, w), channels=c, mean=[0.5] * c, std=[0.5] * c,
                         resize="crop" if c == 3 else "stretch")
        card_path = Path(args.teacher) if args.teacher else random_card(tmp, args.arch, spec=spec,
                                                                         classes=args.classes)
        card = load_card(card_path)
        if args.jpeg:
            jw, jh = (int(v) for v in args.jpeg.lower().split("x"))
            args.pool = str(jpeg_pool(tmp / "jpegs", args.num, jw, jh))
        index, source = pool_index(args.pool, args.num, tmp)
        if args.jpeg:
            source = f"{args.num} generated {args.jpeg} RGB JPEGs, quality 90"
        paths = open_pool(index).paths
        n = len(paths)
        default_w = default_workers(dev)
        header("select throughput", dev, amp, {
            "teacher": f"{card.arch or card.torchscript} "
                       f"{'(random weights)' if not args.teacher else card_path}, input "
                       f"{card.input.channels}x{card.input.size[0]}x{card.input.size[1]}",
            "pool": source, "batch": args.batch_size, "channels_last": "yes", "decode": ", ".join(decodes),
            "default workers": f"{default_w} (dfkd.runtime.default_workers)"})

        # Baseline: decode once (untimed here), then the bare forward over the in-memory tensor.
        data = decode_images(paths, card.input, workers=default_w)
        images = data.images.pin_memory() if dev.type == "cuda" else data.images
        model = load_model(card, dev)
        channels_last = not isinstance(model, torch.jit.ScriptModule)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        raw_forward(model, images[: 2 * args.batch_size], card.input, dev, args.batch_size, amp, channels_last)
        raws: list[float] = []
        share = CpuShare()

        def raw() -> float:
            raws.append(len(images) / raw_forward(model, images, card.input, dev, args.batch_size, amp,
                                                  channels_last))
            return raws[-1]

        def paired(measure) -> tuple[float, float]:
            """Rate of ``measure()`` and its ratio to the raw forwards just before and after it."""
            before = raws[-1] if raws else raw()
            rate = measure()
            return rate, rate / ((before + raw()) / 2)

        def timed(fn) -> float:
            with timer(dev) as elapsed:
                fn()
            return n / elapsed()

        def decoding(where: str):
            os.environ["DFKD_GPU_DECODE"] = "1" if where == "gpu" else "0"  # read by dfkd.gpu_decode.enabled

        def run_engine():
            rows = [{"path": p} for p in paths]
            rt = Runtime(dev, amp, default_w, SINGLE)
            for _ in stream(model, card.input, lambda: iter(rows), len(rows),
                            lambda out, labels, p, errors: [(float(v),) for v in out.max(1).values], rt,
                            batch_size=args.batch_size):
                pass

        # Warm-up select on a few batches (imports, first-call allocations), then the real runs.
        warm = tmp / "warm.tsv"
        warm.write_text("path\n" + "".join(p + "\n" for p in paths[: 2 * args.batch_size]))
        select_pool(card, warm, tmp / "sel-warm", num_images=10, batch_size=args.batch_size, workers=0, device=str(dev),
                    amp=amp)

        def run_select(w: int):
            out = tmp / f"sel-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            select_pool(card, index, out, num_images=max(1, n // 2), batch_size=args.batch_size, workers=w,
                        device=str(dev), amp=amp)

        rows = [(f"decode_images (PIL), {default_w} workers", timed(lambda: decode_images(
            paths, card.input, workers=default_w)), None)]
        for d in decodes:
            decoding(d)
            rows.append((f"scoring engine, {default_w} workers, {d}", *paired(lambda: timed(run_engine))))
        runs: dict[tuple[int, str], list[tuple[float, float]]] = {(w, d): [] for w in workers_list for d in decodes}
        start = time.perf_counter()
        for rep in range(max(1, args.repeats)):
            if rep and time.perf_counter() - start > args.budget:
                print(f"  (stopped after {rep} of {args.repeats} repeats: --budget {args.budget:g}s)")
                break
            for (w, d), got in runs.items():
                decoding(d)
                got.append(paired(lambda: timed(lambda: run_select(w))))
        os.environ.pop("DFKD_GPU_DECODE", None)
        for (w, d), got in runs.items():
            mark = "  <- default" if w == default_w else ""
            rows.append((f"select_pool, {w} workers, {d}{mark}", statistics.median(r for r, _ in got),
                         statistics.median(q for _, q in got)))
        rows.insert(0, ("raw forward (baseline, median)", statistics.median(raws), 1.0))

        print(f"  {'':<44}  {'throughput':>16}  {'ratio to raw forward':>20}")
        for name, rate, ratio in rows:
            print(f"  {name:<44}  {fmt_rate(rate):>16}  {'' if ratio is None else f'{ratio:20.2f}'}")
        for d in decodes:
            selects = {w: r for (w, dd), r in zip(runs, rows[-len(runs):]) if dd == d}
            best = max(selects, key=lambda w: selects[w][1])
            chosen = default_w if default_w in selects else best
            print(f"RATIO select ({d} decode) / raw forward = {selects[chosen][2]:.2f}  ({chosen} workers;"
                  f" best: {best} workers, {selects[best][2]:.2f})")
        print(f"  contention: {share.report()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
