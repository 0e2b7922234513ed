"""Shared pieces of the benchmarks: the machine header, a teacher card, a pool, timers.

Benchmarks are not tests: they print figures, each against a baseline measured in the same
run, so that a ratio means something on any machine. Run them with ``make bench``.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dfkd.cards import build_arch, save_card
from dfkd.images import InputSpec, open_pool
from dfkd.index import write_index
from dfkd.runtime import autocast

REPO = Path(__file__).resolve().parent.parent
DEMO_POOL = REPO / "data" / "demo" / "wild"
SPEC = InputSpec(size=(28, 28), channels=1, mean=[0.5], std=[0.5])
NUM_CLASSES = 10


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def header(title: str, device: torch.device, amp: bool, extra: dict | None = None) -> None:
    """Print what the figures below were measured on."""
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (host: {cpu_model()}, {cores()} cores)"
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else torch.float32
    else:
        machine = f"{cpu_model()}, {cores()} cores, {torch.get_num_threads()} torch threads"
        dtype = torch.bfloat16 if amp else torch.float32
    rows = {"machine": machine, "torch": torch.__version__, "device": str(device),
            "dtype": f"{str(dtype).replace('torch.', '')} ({'autocast' if amp else 'no autocast'})",
            "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            **(extra or {})}
    print(f"== {title} ==")
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timer(device: torch.device):
    """``with timer(dev) as t: ...`` then ``t()`` is the elapsed seconds (device synchronised)."""
    sync(device)
    start = time.perf_counter()
    box = [None]
    try:
        yield lambda: box[0]
    finally:
        sync(device)
        box[0] = time.perf_counter() - start


def random_card(folder: Path, arch: str, seed: int = 0, spec: InputSpec = SPEC,
                classes: int = NUM_CLASSES) -> Path:
    """A model card for ``arch`` (28×28×1 and 10 classes unless told) with random (seeded)
    weights: speed needs no training."""
    torch.manual_seed(seed)
    model = build_arch(arch, classes, spec.channels)
    return save_card(folder / f"{arch.replace(':', '-')}.yaml", arch, classes, spec, model.state_dict(),
                     kind="teacher", accuracy=0.9, notes="random weights, for benchmarks only")


WALLPAPERS = [Path("/usr/share/wallpapers"), Path("/usr/share/backgrounds")]


def wallpapers() -> list[Path]:
    """Photographs and renderings from Debian's wallpaper packages (gnome-backgrounds,
    plasma-workspace-wallpapers), at least 1000 px on their shorter side."""
    from PIL import Image

    found = []
    for root in WALLPAPERS:
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and "screenshot" not in p.name:
                try:
                    with Image.open(p) as img:
                        if min(img.size) >= 1000:
                            found.append(p)
                except OSError:
                    continue
    return found


def _noise_jpeg(i: int, w: int, h: int, sources: list[Path]):
    from PIL import Image

    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.BICUBIC)


def _photo_crop(i: int, w: int, h: int, sources: list[Path]):
    """A random crop of a wallpaper (a random scale from 1 to 3 times the size), resized to w×h."""
    from PIL import Image

    rng = np.random.default_rng(i)
    with Image.open(sources[i % len(sources)]) as img:
        img = img.convert("RGB")
        scale = min(rng.uniform(1.0, 3.0), img.width / w, img.height / h)
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
        return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)


def _write_jpegs(args: tuple) -> None:
    folder, start, stop, w, h, prefix, make, sources = args
    for i in range(start, stop):
        make(i, w, h, sources).save(folder / f"{prefix}-{i:06d}.jpg", quality=90)


def _pool(make, sources, folder: Path, n: int, width: int, height: int, processes: int | None, prefix: str) -> Path:
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    procs = processes or cores()
    step = -(-n // procs)
    with Pool(procs) as pool:
        pool.map(_write_jpegs, [(folder, a, min(n, a + step), width, height, prefix, make, sources)
                                for a in range(0, n, step)])
    return folder


def jpeg_pool(folder: Path, n: int, width: int, height: int, processes: int | None = None,
              prefix: str = "img") -> Path:
    """``n`` RGB JPEGs of ``width``×``height`` (smooth noise, quality 90: photo-like in size and
    decoding cost), written in parallel; the same arguments give the same files."""
    return _pool(_noise_jpeg, [], folder, n, width, height, processes, prefix)


def photo_pool(folder: Path, n: int, width: int, height: int, processes: int | None = None,
               prefix: str = "photo") -> Path:
    """``n`` real photographs as baseline JPEGs of ``width``×``height`` (quality 90): random crops
    of :func:`wallpapers`; the same arguments give the same files."""
    sources = wallpapers()
    if not sources:
        sys.exit("no wallpapers found: apt-get install gnome-backgrounds plasma-workspace-wallpapers")
    return _pool(_photo_crop, sources, folder, n, width, height, processes, prefix)


def _write_pngs(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` smooth random 28×28 grey PNGs (blurred noise compresses like real small images)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (7, 7), dtype=np.uint8)
        Image.fromarray(small, "L").resize((28, 28), Image.BILINEAR).save(folder / f"img-{i:05d}.png")


def pool_index(pool: str | None, n: int, folder: Path) -> tuple[Path, str]:
    """An index file of ``n`` pool images, spread evenly over the pool; and where they came from.

    ``pool`` None: the demo's wild pool when it exists, else ``n`` generated PNGs.
    """
    if pool is None and DEMO_POOL.is_dir():
        pool = str(DEMO_POOL)
    if pool is None:
        _write_pngs(folder / "pool", n)
        pool, source = str(folder / "pool"), f"{n} generated 28x28 PNGs"
    else:
        source = pool
    paths = open_pool(pool).paths
    if len(paths) > n:
        paths = [paths[round(i * len(paths) / n)] for i in range(n)]
    index = write_index(folder / "pool.tsv", [{"path": p} for p in paths], ["path"])
    return index, f"{source} ({len(paths)} images)"


def raw_forward(model: torch.nn.Module, images: torch.Tensor, spec: InputSpec, device: torch.device,
                batch_size: int, amp: bool, channels_last: bool) -> float:
    """Seconds to normalise and forward every image of an in-memory uint8 tensor (no logits copy)."""
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    with torch.inference_mode(), timer(device) as elapsed:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True).float().div_(255.0)
            x = (x - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                model(x)
    return elapsed()


class CpuShare:
    """How many cores *other* processes kept busy between ``__init__`` and ``report()``.

    From /proc/stat (all processes) minus this process and its reaped children (loader workers).
    """

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system, irq softirq steal
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system, \
            time.perf_counter()

    def report(self) -> str:
        end = self._snapshot()
        if self.start is None or end is None:
            return "unknown (no /proc/stat)"
        busy, mine, wall = (b - a for a, b in zip(self.start, end))
        others = max(0.0, busy - mine) / max(wall, 1e-9)
        note = ""
        if others > 0.25 and torch.get_num_threads() > max(1, cores() - round(others)):
            note = ("\n  busy machine: absolute figures are noisy, compare the paired ratios. With more torch"
                    "\n  threads than free cores, every parallel op waits for a descheduled thread;"
                    f"\n  --threads {max(1, cores() - round(others))} or an idle machine gives steadier figures.")
        return f"other processes kept {others:.2f} of {cores()} cores busy during the run{note}"


def fmt_rate(x: float) -> str:
    return f"{x:10.0f} img/s"


def _private_bytes(pid: int) -> int:
    """RssAnon of ``pid`` and its descendants (bytes), 0 for processes gone meanwhile."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak private bytes of ``cmd`` (its exit status must be 0)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _private_bytes(proc.pid))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{err.decode()[-2000:]}")
    return wall, peak[0]
