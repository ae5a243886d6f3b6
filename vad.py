"""
vad: find and localize defects in images of manufactured parts, after seeing only
defect-free examples. One file, one fitted model per `.pt`, no network at scoring time.

A detector is fitted on normal images of one part or surface. It then gives every new
image a score (higher is more anomalous), a verdict against a threshold calibrated on
held-out normal images, and an anomaly map that localizes the defect. Images are
framed for the model (stretched, letterboxed or cropped to a working size, optionally
cut into tiles scored at full resolution) and maps come back at each image's own size.
Four detectors: PaDiM and PatchCore (pretrained features, no training), EfficientAD (a
student network distilled from a pretrained teacher) and a convolutional autoencoder
(no pretraining at all).

Usage:
    python vad.py fit --model padim --data mvtec/bottle            # -> bottle-padim.pt
    python vad.py score bottle-padim.pt images/*.png               # path, score, verdict
    find images -name '*.png' | python vad.py score bottle-padim.pt - --json
    python vad.py bench --model padim --model patchcore --data mvtec/bottle
    python vad.py fit --model efficientad --data mvtec/bottle --epochs 30
    python vad.py fit --model padim --data kolektorsdd --image-size 640x256   # H x W
    python vad.py fit --model patchcore --data web/ --image-size native --tile 256
    python vad.py fit --update bottle-patchcore.pt --data line3/new_good   # add normal images
    python vad.py serve bottle-padim.pt                            # browser page + JSON API
    python vad.py calibrate bottle-padim.pt --good line3/ok --target-frr 0.005
    python vad.py info bottle-padim.pt                             # what a model is, its thresholds' error rate
    python vad.py export bottle-padim.pt                           # -> bottle-padim.onnx (pip install onnx onnxruntime)
    python vad.py score bottle-padim.onnx images/*.png --shard 0/4   # ONNX Runtime; the first of 4 slices

Python API:
    import vad
    model = vad.fit("mvtec/bottle", "patchcore", backbone="resnet18")
    vad.save(model, "bottle.pt")
    model = vad.load("bottle.pt")
    image_scores, anomaly_maps = model.score(images)  # images: (B, 3, H, W) in [0, 1]

Contents (in file order). The core, from Errors to API, stands on its own: nothing in it
refers to the tools below it (a test checks it), so a vendor can cut the file at "Tools".
    Errors, messages, device and precision   one-line errors, stderr notes, the precision policy
    Plumbing                progress bars, stage timers (bench only), prefetching, strict JSON, atomic writes
    Backbones               ResNet-18, Wide-ResNet-50-2, MobileNetV2 in torchvision's layout
    Anomaly maps            bilinear upsampling and Gaussian blur as matrix products
    Framing                 working size, resize mode and tiles: how an image becomes an input
    Detector                what every detector shares (config, buffers, fitted-state checks)
    PaDiM                   Mahalanobis distances, a Gaussian per position
    PatchCore's memory bank greedy coreset, Voronoi cells, exact nearest-neighbour search
    PatchCore               patch features, eq. 7
    Detectors that train    augmentation, the training loop, fused maps
    EfficientAD, Autoencoder and SSIM
    Detector registry       DETECTORS, -s KEY=VALUE settings
    Model files             save, load (one .pt, weights_only, every field and tensor checked)
    Image I/O               placement in the frame, tiles and their stitching, images, masks, data sets
    API                     score_files, RunOptions, fit, update, metrics, evaluate, drift
  Tools
    Export                  one ONNX graph per model, parity-checked; scoring it with ONNX Runtime
    Bench                   bench, peak memory and the embedded synthetic set
    Heat maps, Serving      overlays, defect masks and regions; the upload-and-inspect page, JSON endpoint, /metrics
    CLI                     fit, score, calibrate, info, export, bench, serve; the model-file lock

References:
    Report      "Visual Anomaly Detection and Segmentation for Industrial Inspection"
                (ENSA Tetouan), the report this tool grew from, cited as "the report":
                its EfficientAD (sec. 4.3), autoencoder (sec. 4.4) and web service (ch. 6)
    SSIM        Wang et al., "Image Quality Assessment: From Error Visibility to
                Structural Similarity", IEEE TIP 2004
    PatchCore   Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
                CVPR 2022, arXiv:2106.08265
    PaDiM       Defard et al., "PaDiM: a Patch Distribution Modeling Framework for
                Anomaly Detection and Localization", ICPR 2021, arXiv:2011.08785
    EfficientAD Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at
                Millisecond-Level Latencies", WACV 2024, arXiv:2303.14535
    Coresets    Indyk et al., "Composable Core-sets for Diversity and Coverage
                Maximization", PODS 2014 (PatchCore's bank built in parts)
    Cells       Jegou et al., "Product Quantization for Nearest Neighbor Search",
                IEEE TPAMI 2011 (the inverted file that PatchCore's exact search prunes)
    MVTec AD    Bergmann et al., "MVTec AD - A Comprehensive Real-World Dataset for
                Unsupervised Anomaly Detection", CVPR 2019 (data layout, AUPRO)
    Backbones   He et al., "Deep Residual Learning for Image Recognition", CVPR 2016;
                Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016; Sandler et
                al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018
                (defined here in torchvision's layout, so its ImageNet files load)
"""

import base64
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import email.utils
import fcntl
import fnmatch
import functools
import glob
import hashlib
import http
import importlib
import io
import itertools
import json
import math
import mmap
import os
import platform
import queue
import re
import resource
import selectors
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
import types
import typing
import urllib.parse
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin, UnidentifiedImageError

__version__ = "0.1.0"
FORMAT_NAME = "vad-model"
FORMAT_VERSION = 5  # bump on any change to what a .pt holds; other versions are refused (history: README)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every torchvision ImageNet backbone expects these
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 256  # both papers resize MVTec AD to 256 (PatchCore then crops 224; we do not)
BLUR_SIGMA = 4.0  # PaDiM sec. 3 and PatchCore sec. 3.3 smooth the upsampled map with sigma = 4
CHUNK_BYTES = 256 * 2**20  # working memory for one block of a distance matrix
BANK_BYTES = 2 * 2**30  # raw PatchCore patch features held before they are thinned (a WRN50 bottle bank is 1.2 GB)
# ... and at most this many patches: the greedy coreset of n patches costs n * ratio * n, so
# parts of bounded size make fit linear in the images (256 images of 1,024 patches at 256 px:
# MVTec's and KolektorSDD's training sets are one part, as before).
PART_ROWS = 2**18
BATCH_SIZE = 16
TILE_OVERLAP = 0.25  # fraction by which neighbouring tiles overlap
HOLDOUT = 0.1  # fraction of the normal training images kept out to calibrate the threshold
MAX_PIXELS = 100_000_000  # per image, frame and map: larger images are refused before decoding (bombs)
MAX_SIDE = 16384  # px, of a working frame or a tile
MAX_TILES = 16384  # per image: its tiles are held at once, so they are bounded by count ...
MAX_TILED_PIXELS = 2**28  # ... and by pixels (3 GiB as fp32 RGB; 2.7x MAX_PIXELS allows overlaps of 0.4)
MAX_BATCH_PIXELS = 2**24  # model inputs per batch shrink below --batch-size when they are large (200 MB of fp32 RGB)
MAX_SEED = 2**62  # seeds are 0..MAX_SEED: torch's generators take 64 bits, and seed + a part count must fit
MAX_MODEL_BYTES = 8 * 2**30  # the most a model file may unpack to; load() checks before reading
MAX_PICKLE_BYTES = 2**20  # a .pt's record of names and layout (a WRN50 state dict's is ~40 KB)
MAX_NESTING = 32  # containers within containers in a .pt's record (vad's own nest 5 deep, torchvision's 4)
CACHE_DIR = Path(os.environ.get("VAD_CACHE", Path.home() / ".cache" / "vad"))

# -----------------------------------------------------------------------------
# Errors, messages, device and precision


class VadError(Exception):
    """A problem with the user's input (data, model file, options): shown as one line."""


VERBOSE = False  # progress bars and notes on stderr; the CLI turns them on, the API leaves them off
STOP_SIGNAL = None  # the signal stopping the process (main() sets it): no error then hides the exit status


def note(message):
    if VERBOSE:
        click.echo(message, err=True)


def warn(message):
    """Warnings reach stderr even with --quiet: they say something the user must know."""
    click.echo(f"warning: {message}", err=True)


def pick_device(device="auto"):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise VadError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise VadError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


# One precision policy. Everything is fp32 (statistics and distances fp64 where they
# need it) unless the user asks for bf16 or fp16 with --precision; then the frozen
# backbone runs in it and training steps autocast to it, and the .pt records it.
# Statistics, covariances, Cholesky factors, distances and a trained network's scoring
# stay fp32/fp64 whatever is asked. No choice depends on the CPU's instruction set, so
# one command and seed make the same model on every machine, up to the rounding of its
# fp32 kernels (README, "Precision, CPUs and threads"). bf16 keeps fp32's range with an
# 8-bit mantissa; fp16 has 11 bits but overflows past 65504.
HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: fp32, kept for older scripts


@functools.lru_cache(maxsize=None)
def cpu_info():
    """(model name, flags) of the CPU: /proc/cpuinfo on Linux, else what platform knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    fields = {}
    for line in text.split("\n\n")[0].splitlines():  # the first core speaks for all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or platform.machine()
    return model, frozenset((fields.get("flags") or fields.get("features") or "").split())


def isa_level():
    """The widest vector/matrix extension torch's CPU kernels can use here."""
    flags = cpu_info()[1]
    for flag, level in (("amx_bf16", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return level
    return platform.machine()


def cpu_has_bf16():
    """AMX or AVX512-BF16: bf16 matrix products in hardware (x86 Linux; False elsewhere)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_info()[1])


def pick_precision(precision, device):
    """The number format asked for, checked ("auto" is fp32); warns where bf16 has no
    hardware support and would only be slower."""
    if precision not in PRECISIONS:
        raise VadError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warn("--precision bf16: this CPU has no bf16 instructions (AMX/AVX512-BF16); it will be slower than fp32")
    return precision

# -----------------------------------------------------------------------------
# Plumbing the core uses: progress bars, stage timers, prefetching, strict JSON, atomic writes


def progress(iterable, total=None, desc="", status=None):
    """Yield from `iterable`, drawing a progress bar with time left on stderr; `status`,
    a function, adds a live note such as the current loss.

    On a terminal the bar redraws in place; elsewhere (logs, CI) a line is written every
    30 s and one when the step ends, so captured stderr stays readable.
    """
    if not VERBOSE:
        yield from iterable
        return
    total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
    live = sys.stderr.isatty()
    start = last = time.perf_counter()
    i = 0

    def line(now):
        left = f"<{(now - start) / i * (total - i):.0f}s" if total and i else ""
        count = f"{i}/{total}" if total else f"{i}"
        return f"{desc}: {count} [{now - start:.0f}s{left}]" + (f" {status()}" if status else "")

    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if live and (now - last > 0.2 or i == total):
            last = now
            sys.stderr.write(f"\r{line(now)}  ")
            sys.stderr.flush()
        elif not live and now - last > 30:
            last = now
            sys.stderr.write(line(now) + "\n")
    now = time.perf_counter()
    if live:
        sys.stderr.write("\n")
    elif now - start > 2:
        sys.stderr.write(line(now) + "\n")


STAGE_SECONDS = collections.defaultdict(float)  # wall seconds per stage, while stage_timing() is on (bench)
TIMING = False


@contextlib.contextmanager
def stage_timing():
    """Time the stages (timed) inside the block, from a clear STAGE_SECONDS. Off
    elsewhere, so that scoring never synchronizes a GPU only to time itself."""
    global TIMING
    STAGE_SECONDS.clear()
    TIMING = True
    try:
        yield STAGE_SECONDS
    finally:
        TIMING = False


@contextlib.contextmanager
def timed(stage, device=None):
    """Add the block's wall time to STAGE_SECONDS[stage] inside stage_timing(); nothing
    otherwise. On CUDA the device is synchronized at both ends, else queued kernels
    would be billed to whichever stage waits next."""
    if not TIMING:
        yield
        return
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        STAGE_SECONDS[stage] += time.perf_counter() - start


def prefetch(iterable, depth=2):
    """Yield from `iterable`, run `depth` items ahead in a background thread: the next
    images are decoded while the current batch is computed (Pillow and torch release the
    GIL while they work). Exceptions surface at the consumer, in order."""
    items, stop, end = queue.Queue(depth), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # handed to the consumer
            put((end, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            with timed("load"):
                item, error = items.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def json_text(obj, **kwargs):
    """JSON that strict parsers read: a float that is NaN or infinite (a metric undefined
    on the data, such as pixel AUROC without masks) is written null, never NaN."""
    def clean(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        return [clean(v) for v in o] if isinstance(o, (list, tuple)) else o
    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


TEMPORARY = re.compile(r"\.(.+)\.([0-9]{1,9})\.[0-9a-f]{8}\.tmp", re.ASCII | re.DOTALL)  # .NAME.PID.HEX.tmp


def _remove_if_stale(tmp, name=None):
    """Delete `tmp` if it is atomic_write()'s temporary (for a file called `name`, if
    given) of a process that no longer runs (killed with SIGKILL, or by a power cut,
    before it could clean up); a running writer's is kept."""
    match = TEMPORARY.fullmatch(tmp.name)
    try:
        if match and name in (None, match[1]) and tmp.is_file() and not tmp.is_symlink() and not _alive(int(match[2])):
            tmp.unlink()
    except OSError:  # best effort: a file we cannot remove is left, never an error
        pass


def remove_stale_temporaries(path):
    """Delete the stale temporaries that atomic_write() left for `path`."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        _remove_if_stale(tmp, path.name)


def remove_stale_temporaries_in(folder):
    """Delete every stale temporary in `folder` and below: one walk for the many files
    of score's output folders, whose writes (durable=False) skip the per-file clean-up."""
    for tmp in Path(folder).rglob(".*.tmp"):
        _remove_if_stale(tmp)


def atomic_write(path, write, durable=True):
    """Call write(tmp_path), then rename onto `path`: readers see the old file or the
    whole new one, never a partial one, whatever interrupts the write (SIGINT and SIGTERM
    clean up here; what a SIGKILL leaves, the next durable write to `path` removes).
    durable=False (score's many heat maps and maps) skips the fsync and that clean-up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if durable:
        remove_stale_temporaries(path)
    # Same folder (rename is atomic only within a file system); created by write() itself
    # so the file gets the usual permissions, not mkstemp's 0600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

# -----------------------------------------------------------------------------
# Backbones: ResNet-18, Wide-ResNet-50-2 and MobileNetV2, defined here up to their taps

# The networks are written out in torchvision's module layout, so torchvision's ImageNet
# files and any state dict saved from torchvision load into them unchanged, and they give
# the same features bit for bit (a test checks it). Defining them here keeps torchvision,
# and its import time, off every path of vad, and builds only the layers a detector taps.

# Channels of the three taps of each backbone. ResNets: layer1/2/3 (strides 4/8/16).
# MobileNetV2 has no named layers; its taps are the last blocks at strides 4, 8 and 16,
# features[3] (24 ch), features[6] (32 ch) and features[13] (96 ch), the same points
# timm's features_only uses, so they play the roles of ResNet layer1/2/3.
BACKBONES = {
    "wide_resnet50_2": (256, 512, 1024),
    "resnet18": (64, 128, 256),
    "mobilenet_v2": (24, 32, 96),
}
MOBILENET_STAGES = ((0, 4), (4, 7), (7, 14))  # features[a:b] for each stage

# torchvision's IMAGENET1K_V1 files (the papers' weights); the hash prefix in each name is
# checked after download
IMAGENET_URLS = {
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "mobilenet_v2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}


def _shortcut(c_in, c_out, stride):
    """The projection shortcut where a block changes shape (None: the identity)."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """ResNet-18's block: two 3x3 convolutions and a shortcut."""

    def __init__(self, c_in, c, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = _shortcut(c_in, c, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """Wide-ResNet-50-2's block: 1x1 in, 3x3 at twice ResNet-50's width, 1x1 out to 4c."""

    def __init__(self, c_in, c, stride=1, width=2):
        super().__init__()
        w = c * width
        self.conv1 = nn.Conv2d(c_in, w, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, 4 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, 4 * c, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A ResNet's stem and its first `depth` layers (the rest and the classifier are never
    used). forward is not defined: FeatureExtractor runs the stages."""

    def __init__(self, block, blocks, depth):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in, expansion = 64, 4 if block is Bottleneck else 1
        for i, (n, c) in enumerate(zip(blocks[:depth], (64, 128, 256))):
            stride = 1 if i == 0 else 2
            layer = [block(c_in, c, stride)] + [block(c * expansion, c) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            c_in = c * expansion


def _conv_bn_relu6(c_in, c_out, kernel=3, stride=1, groups=1):
    """torchvision's Conv2dNormActivation as MobileNetV2 uses it."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion by t, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, c_in, c_out, stride, t):
        super().__init__()
        hidden = c_in * t
        layers = [_conv_bn_relu6(c_in, hidden, 1)] if t != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) up to features[blocks - 1]."""
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))  # t, c, n, s

    def __init__(self, blocks):
        super().__init__()
        features, c_in = [_conv_bn_relu6(3, 32, stride=2)], 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.features = nn.Sequential(*features[:blocks])


def build_backbone(name, depth):
    """The network `name` up to tap `depth` (1-3), in torchvision's layout, uninitialized
    (on the meta device: no memory, no random numbers drawn)."""
    with torch.device("meta"):
        if name == "mobilenet_v2":
            return MobileNetV2(MOBILENET_STAGES[depth - 1][1])
        if name == "resnet18":
            return ResNet(BasicBlock, (2, 2, 2), depth)
        return ResNet(Bottleneck, (3, 4, 6), depth)


def init_backbone(net):
    """Random weights as torchvision initializes these networks: He-normal convolutions
    (fan out), batch norms at identity. Deterministic under the caller's torch seed."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()  # weight 1, bias 0, running mean 0 and variance 1


def _stages(name, net):
    """The network split into its three tap stages, the stem in the first."""
    if name == "mobilenet_v2":
        return [net.features[a:b] for a, b in MOBILENET_STAGES if a < len(net.features)]
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    return [stem] + [getattr(net, f"layer{i}") for i in (2, 3) if hasattr(net, f"layer{i}")]


def pickle_depth(data):
    """How deeply the containers that a pickle builds nest, found by walking its opcodes
    (pickletools.genops) without building anything. A crafted file can nest a value a
    million deep: unpickled, hashing or comparing it recurses in C and kills the process
    (no Python exception to catch), so the depth is bounded before torch.load sees it."""
    import pickletools
    mark, stack, memo, deepest = object(), [], {}, 0
    for op, arg, _ in pickletools.genops(data):
        before, after = op.stack_before, op.stack_after
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1]
            continue
        if op.name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
            continue
        if op.name == "DUP":
            stack.append(stack[-1])
            continue
        items = []
        if pickletools.stackslice in before:  # [..., markobject, stackslice]: through the mark
            while stack[-1] is not mark:
                items.append(stack.pop())
            stack.pop()
            before = before[:-2]
        popped = [stack.pop() for _ in before][::-1] + items  # the container (if any) first
        if any(d is mark for d in popped):
            raise ValueError("unbalanced mark")
        if not after:
            continue
        if after == [pickletools.markobject]:
            stack.append(mark)
            continue
        if before and before[0] is after[0]:  # SETITEMS, APPENDS, BUILD, REDUCE: into the first
            depth = max(popped[-1 if len(popped) == 1 else 0], 1 + max(popped[1:], default=-1))
        else:
            depth = 1 + max(popped) if popped else 0
        deepest = max(deepest, depth)
        stack += [depth] * len(after)
    return deepest


def check_archive(path, label):
    """The pickle record of a torch zip archive that may be crafted, checked before
    anything is unpickled: only stored (uncompressed) records, as torch.save writes them
    (a small file that inflates to gigabytes is refused), at most MAX_MODEL_BYTES in all,
    one pickle record of at most MAX_PICKLE_BYTES whose containers nest at most
    MAX_NESTING deep. label: how errors name the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            pickles = [r for r in records if r.filename.endswith("/data.pkl")]
            if any(r.compress_type != zipfile.ZIP_STORED for r in records):
                raise VadError(f"{label} holds compressed records, which torch.save never writes")
            total = sum(r.file_size for r in records)
            if total > MAX_MODEL_BYTES:
                raise VadError(f"{label} unpacks to {total:,} bytes, over vad's limit of {MAX_MODEL_BYTES:,}")
            if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
                raise VadError(f"{label} is not a torch file vad reads (its record of names and layout is missing, "
                               f"doubled, or over {MAX_PICKLE_BYTES:,} bytes)")
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, ValueError):
        raise VadError(f"{label} is not a torch zip archive") from None
    except OSError as e:
        raise VadError(f"cannot read {label}: {e.strerror or e}") from None
    try:
        depth = pickle_depth(data)
    except (ValueError, IndexError, KeyError, TypeError):
        raise VadError(f"{label} is unreadable or truncated (its pickle record does not parse)") from None
    if depth > MAX_NESTING:
        raise VadError(f"{label} nests containers {depth} deep, over vad's limit of {MAX_NESTING}")


def load_tensors(path, missing, unreadable):
    """torch.load of a file that may be crafted: bounded and checked first (check_archive),
    then only tensors and plain containers are unpickled (weights_only), so loading
    cannot run code. missing and unreadable are the one-line errors (unreadable's
    {reason} says why)."""
    if not Path(path).is_file():
        raise VadError(missing)
    try:
        check_archive(path, "the file")
    except VadError as e:
        raise VadError(unreadable.replace("{reason}", str(e))) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = "weights_only" in str(e) or "Unpickl" in type(e).__name__
        reason = "refused unsafe content" if unsafe else "unreadable or truncated"
        raise VadError(unreadable.replace("{reason}", reason)) from None


def load_backbone_weights(name, weights):
    """State dict for `name` in torchvision's layout: "imagenet" downloads torchvision's
    file into the torch hub cache (or finds it there), anything else is a path to a
    torchvision state dict."""
    if weights == "imagenet":
        url = IMAGENET_URLS[name]
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torch.hub announces downloads on stdout
                return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=VERBOSE,
                                                          check_hash=True, weights_only=True)
        except Exception as e:  # urllib raises several types offline
            raise VadError(
                f"cannot get ImageNet weights for {name} ({type(e).__name__}: {e}); offline, put "
                f"{Path(url).name} in {cache}, or pass --weights PATH to a torchvision state dict, "
                f"or --weights none for random init") from None
    state = load_tensors(weights, f"--weights {weights}: no such file; use imagenet, none, or a path to a "
                                  f"torchvision state dict", f"--weights {weights}: not a readable state dict ({{reason}})")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VadError(f"--weights {weights}: not a state dict")
    return state


def load_truncated(net, state, name, weights):
    """Copy a whole network's state dict into the truncated `net`: every tensor `net` has
    must be there with its shape; those of the layers beyond the taps are ignored."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise VadError(f"--weights {weights} does not fit {name}: {len(missing)} of its {len(own)} tensors "
                       f"missing, {missing[0]} the first")
    try:
        net.load_state_dict({k: state[k] for k in own})
    except Exception as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise VadError(f"--weights {weights} does not fit {name}: {first}") from None


def grid_size(n, stride):
    """Positions along a side of n pixels in a backbone map of the given stride (4, 8
    or 16): every stride-2 step of these backbones (3x3 pad 1, 7x7 pad 3, 3x3 max pool
    pad 1) maps n to ceil(n / 2)."""
    for _ in range(int(math.log2(stride))):
        n = (n + 1) // 2
    return n


class FeatureExtractor(nn.Module):
    """A backbone cut after the deepest stage a detector uses, with the input
    normalization built in: it takes images in [0, 1] and returns the tapped maps.

    weights: "imagenet", "none" (random init, seeded by the caller), a state-dict path,
    or "empty" (no init at all: the weights come next from a vad model file). A frozen
    extractor (the default) never trains; EfficientAD's student is one that does.
    """

    def __init__(self, name, layers, weights="imagenet", frozen=True):
        super().__init__()
        self.frozen = frozen
        if name not in BACKBONES:
            raise VadError(f"unknown backbone {name!r}: choose from {', '.join(BACKBONES)}")
        self.name, self.layers = name, tuple(layers)
        net = build_backbone(name, max(self.layers))
        if weights != "empty":  # "empty": the weights come next, from a vad model file
            # building a frozen backbone (random init or loading weights) is not detector work
            with timed("backbone") if frozen else contextlib.nullcontext():
                net.to_empty(device="cpu")
                if weights == "none":
                    init_backbone(net)
                else:
                    load_truncated(net, load_backbone_weights(name, weights), name, weights)
        self.stages = nn.ModuleList(_stages(name, net))
        if weights == "empty":
            self.stages.to_empty(device="cpu")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(not frozen)
        self.eval()
        self.precision = "fp32"

    def set_precision(self, precision):
        """fp32, or bf16/fp16 for the convolutions (autocast, channels_last: the layout
        oneDNN's AMX kernels and cuDNN's tensor cores want). Frozen extractors only."""
        self.precision = precision if self.frozen else "fp32"
        layout = torch.channels_last if self.precision in HALF_TYPES else torch.contiguous_format
        self.stages.to(memory_format=layout)

    @property
    def channels(self):
        return [BACKBONES[self.name][i - 1] for i in self.layers]

    def grids(self, input_size):
        """(h, w) of each tapped map for inputs of input_size (H, W): layer l has stride 2^(l+1)."""
        return [tuple(grid_size(n, 2 ** (layer + 1)) for n in input_size) for layer in self.layers]

    def train(self, mode=True):
        return super().train(mode and not self.frozen)  # frozen: batch norm keeps its ImageNet statistics

    def forward(self, images, channels_last=False):
        """images (B, 3, H, W) in [0, 1] -> list of maps (B, C_l, H/s_l, W/s_l), one per layer,
        fp32; contiguous, or with channels_last=True in whichever layout is at hand
        (a half-precision backbone's is channels last, and a caller that wants it
        need not have it transposed there and back)."""
        x = (images - self.mean) / self.std
        half = HALF_TYPES.get(self.precision)
        with contextlib.ExitStack() as stack:
            if self.frozen:
                stack.enter_context(timed("features", x.device))
            if half is not None:
                stack.enter_context(torch.autocast(x.device.type, half))
                x = x.contiguous(memory_format=torch.channels_last)
            features = []
            for depth, stage in enumerate(self.stages, 1):
                x = stage(x)
                if depth in self.layers:
                    features.append(x if half is None else x.float() if channels_last else x.float().contiguous())
        return features

# -----------------------------------------------------------------------------
# Anomaly maps: bilinear upsampling and Gaussian blur as matrix products


def gaussian_kernel(sigma, truncate=4.0):
    """1-D Gaussian of radius int(truncate*sigma + 0.5), as scipy.ndimage builds it."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_matrix(n, sigma):
    """(n, n) matrix G with G @ v = v blurred by a 1-D Gaussian, the borders mirrored
    without repeating the edge sample (scipy.ndimage mode="mirror")."""
    if sigma <= 0:
        return torch.eye(n, dtype=torch.float64)
    k = gaussian_kernel(sigma)
    r = min(len(k) // 2, n - 1)  # a reflection cannot reach past the far edge
    k = k[len(k) // 2 - r: len(k) // 2 + r + 1]
    columns = F.pad(torch.eye(n, dtype=torch.float64)[:, None], (r, r), mode="reflect")  # (n, 1, n + 2r)
    return F.conv1d(columns, k.view(1, 1, -1))[:, 0].T  # blur of each unit vector = a column of G


def upsample_matrix(n, size):
    """(size, n) matrix U with U @ v = v linearly resized to `size` samples (half-pixel
    centers, torch's align_corners=False): one axis of bilinear upsampling."""
    eye = torch.eye(n, dtype=torch.float64)[:, None]  # (n, 1, n)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0].T


@functools.lru_cache(maxsize=16)
def _postprocess_matrix(n, size, sigma, device, dtype):
    return (blur_matrix(size, sigma) @ upsample_matrix(n, size)).to(device, dtype)


def upsample_and_blur(patch_maps, size, sigma=BLUR_SIGMA):
    """Patch scores (B, h, w) -> anomaly maps (B, H, W), size = (H, W) or N for (N, N):
    bilinear upsampling, then a
    Gaussian blur, as both PaDiM and PatchCore post-process. Both steps are separable and
    linear, so the whole thing is A_h @ map @ A_w^T with A = blur @ upsample, two small
    matrix products instead of a 33-tap convolution over every output pixel."""
    h, w = (int(n) for n in patch_maps.shape[-2:])  # plain ints under an ONNX trace too: cache keys
    H, W = (size, size) if isinstance(size, int) else size
    with timed("maps", patch_maps.device):
        A_h = _postprocess_matrix(h, H, float(sigma), patch_maps.device, patch_maps.dtype)
        A_w = _postprocess_matrix(w, W, float(sigma), patch_maps.device, patch_maps.dtype)
        return A_h @ patch_maps @ A_w.T

# -----------------------------------------------------------------------------
# Framing: how an image becomes a model input (size, aspect ratio, tiles)


RESIZES = ("fit", "pad", "crop")


def parse_size(text, minimum=32):
    """--image-size: "N" (square), "HxW", or "native" (each image keeps its own size;
    only with --tile) -> (H, W) or None."""
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, (tuple, list)):
        text = "x".join(map(str, text))
    if text == "native":
        return None
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(minimum <= v <= MAX_SIDE for v in size):
        raise VadError(f"--image-size {text}: give N or HxW (height x width), each {minimum}..{MAX_SIDE}, or native")
    if size[0] * size[1] > MAX_PIXELS:
        raise VadError(f"--image-size {text}: {size[0] * size[1]:,} pixels is over vad's limit of {MAX_PIXELS:,}; "
                       f"use --image-size native with --tile for larger images")
    return size


def tile_count(length, tile, overlap):
    """Tiles along one axis of `length` px (tile_starts), counted without listing them."""
    return 1 if length <= tile else math.ceil((length - tile) / max(1, tile * (1 - overlap))) + 1


def tile_starts(length, tile, overlap):
    """Tile offsets along one axis: evenly spread, the first at 0 and the last flush with
    the end, at most tile * (1 - overlap) apart. One tile if the axis is no longer."""
    n = tile_count(length, tile, overlap)
    return [0] if n == 1 else [round(i * (length - tile) / (n - 1)) for i in range(n)]


@dataclass
class Framing:
    """How an image becomes the model's input, and how its map goes back.

    size: the working frame (H, W) every image is brought to (None: its own size).
    resize: fit (stretch to the frame), pad (keep the aspect ratio, letterbox; the
    padding is never scored), crop (keep the aspect ratio, fill the frame, cut the
    overhang; the cut-off parts are not inspected and their map is NaN).
    tile: if set, the frame is cut into tile x tile squares overlapping by `overlap`,
    each scored at full resolution and the maps blended back together.
    """
    size: typing.Optional[tuple] = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    resize: str = "fit"
    tile: typing.Optional[int] = None
    overlap: float = TILE_OVERLAP

    def __post_init__(self):
        self.size = None if self.size is None else tuple(int(v) for v in self.size)
        if self.resize not in RESIZES:
            raise VadError(f"--resize {self.resize}: use {', '.join(RESIZES)}")
        if self.size is not None and (len(self.size) != 2 or not 1 <= min(self.size) <= max(self.size) <= MAX_SIDE
                                      or self.size[0] * self.size[1] > MAX_PIXELS):
            raise VadError(f"working size {self.size}: must be (H, W), sides 1..{MAX_SIDE}, at most {MAX_PIXELS:,} "
                           f"pixels")
        if self.tile is not None and not 32 <= self.tile <= MAX_SIDE:
            raise VadError(f"--tile {self.tile}: tiles must be 32..{MAX_SIDE} px")
        if not 0 <= self.overlap < 1:
            raise VadError(f"--tile-overlap {self.overlap}: must be in [0, 1)")
        if self.size is None and self.tile is None:
            raise VadError("--image-size native needs --tile N (images of any size are then cut into tiles)")
        if self.size is not None:
            self.check_tiles(self.size, f"a {self.size[0]}x{self.size[1]} frame")

    def check_tiles(self, frame, what):
        """Refuse a frame (H, W) that would be cut into more tiles than vad's limits allow
        (memory: all the tiles of one image are held at once)."""
        if not self.tile:
            return
        n = tile_count(frame[0], self.tile, self.overlap) * tile_count(frame[1], self.tile, self.overlap)
        if n > MAX_TILES or n * self.tile ** 2 > MAX_TILED_PIXELS:
            raise VadError(f"{what} in tiles of {self.tile} px overlapping by {self.overlap:g} makes {n:,} tiles, over "
                           f"vad's limit of {MAX_TILES:,} tiles or {MAX_TILED_PIXELS:,} tile pixels per image; use "
                           f"larger tiles or less overlap")

    @property
    def input_size(self):
        """What the detector itself sees: (H, W)."""
        return (self.tile, self.tile) if self.tile else self.size


def framing_from_record(record):
    """The Framing a model file records (a .pt's framing, an .onnx's metadata), which may
    be crafted: every field's type checked before its value, then Framing's own limits,
    the ones fit applies. Raises ValueError."""
    size, tile, overlap = (record.get(k) for k in ("size", "tile", "overlap")) if isinstance(record, dict) else [0] * 3
    if not (isinstance(record, dict) and set(record) == {f.name for f in dataclasses.fields(Framing)}
            and (size is None or isinstance(size, (list, tuple)) and len(size) == 2
                 and all(type(v) is int for v in size))
            and isinstance(record["resize"], str) and (tile is None or type(tile) is int)
            and type(overlap) in (int, float)):
        raise ValueError("its framing is not valid")
    try:
        return Framing(**record)
    except VadError as e:
        raise ValueError(f"its framing is not valid: {e}") from None


def as_framing(framing):
    """A Framing, from a Framing, an int, (H, W), or "HxW" (stretched, untiled)."""
    return framing if isinstance(framing, Framing) else Framing(parse_size(framing, minimum=1))

# -----------------------------------------------------------------------------
# Detector: what every detector shares


class Detector(nn.Module):
    """Shared frame: a config, a frozen feature extractor, fitted state in buffers, and the
    calibration that every detector gets from held-out normal images."""
    name = None
    Config = None

    def __init__(self, config, input_size=DEFAULT_IMAGE_SIZE):
        super().__init__()
        self.config = config
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)  # (H, W)
        self.framing = Framing(self.input_size)  # how images become inputs; fit() and load() set it
        self.register_buffer("threshold", torch.tensor(float("nan")))  # on image scores
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))  # on map values: heat-map outlines
        self.register_buffer("map_low", torch.tensor(0.0))  # typical normal map value (heat-map colour scale)
        # What the three come from, one value per held-out image (fp64: the scores exactly):
        # `fit --update` adds the new images' own and derives all three again (set_thresholds).
        self.register_buffer("held_out_scores", torch.empty(0, dtype=torch.float64))  # (H,)
        self.register_buffer("held_out_maxima", torch.empty(0, dtype=torch.float64))  # (H,) of each map
        self.register_buffer("held_out_medians", torch.empty(0, dtype=torch.float64))  # (H,) of each map
        self.precision = "fp32"  # number format of the backbone and of training (set_precision)
        self.info = {}  # how it was fitted (data, weights, seed, image counts): fit() and load() fill it
        self.sha256 = None  # the checksum of the model file it was loaded from (export records it)

    @property
    def device(self):
        return self.threshold.device

    def fit(self, batches, seed=0):
        """Fit on an iterable of normal image batches (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def update(self, batches, seed=0):
        """Add normal image batches to the fitted state, as if fit had seen them after
        its own (PaDiM, PatchCore). A detector that trains cannot: its networks learnt the
        old images, and training on the new ones alone would drift from them."""
        raise VadError(f"{self.name} models cannot be updated with new images: a trained network only learns "
                       f"them by training again; fit it again on all the images")

    def fit_normalization(self, batches):
        """Map statistics from an iterable of held-out normal image batches, for detectors
        that fuse or normalize maps; called after fit and before the threshold is set.
        The others never iterate `batches`, so their held-out images are read once only."""

    def score(self, images):
        """images (B, 3, H, W) in [0, 1] -> (image_scores (B,), anomaly_maps (B, H, W))."""
        raise NotImplementedError

    def map_score(self, anomaly_map):
        """The image score of a stitched or letterboxed map (its scored pixels, 1-D):
        the maximum, as PaDiM and PatchCore score a map."""
        return float(anomaly_map.max())

    def fitted_shapes(self, state):
        """The shapes of the buffers whose size fitting decides, as the config and the
        sizes in `state` (a model file's tensors) imply: {name: shape}. Raises ValueError
        for values that would index out of range."""
        H = len(state["held_out_scores"])
        return {"held_out_scores": (H,), "held_out_maxima": (H,), "held_out_medians": (H,)}

    def check_state(self, state):
        """Raise ValueError unless `state` (name -> tensor, from a model file) fits this
        detector exactly: the same names, each of its own dtype, the fixed shapes equal,
        the fitted ones as fitted_shapes() says, every float finite. Call it on a detector
        built on the meta device, so that a crafted config allocates nothing."""
        own = self.state_dict()
        if set(state) != set(own) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            odd = sorted(set(state) ^ set(own)) or [k for k, t in state.items() if not isinstance(t, torch.Tensor)]
            raise ValueError(f"its tensors do not match a {self.name} model ({', '.join(odd[:3])} ...)")
        for name, t in state.items():  # a view larger than its storage (stride 0) would blow up when copied
            if t.numel() * t.element_size() > t.untyped_storage().nbytes():
                raise ValueError(f"tensor {name} is larger than its storage")
        shapes = {name: tuple(t.shape) for name, t in own.items()} | self.fitted_shapes(state)
        for name, t in state.items():
            if t.dtype != own[name].dtype or tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"tensor {name} is {t.dtype} {tuple(t.shape)}, expected {own[name].dtype} "
                                 f"{tuple(shapes[name])}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"tensor {name} holds NaN or infinite values")

    def set_precision(self, precision):
        """fp32, bf16 or fp16 for the frozen backbone and for training steps (see
        pick_precision); a trained network scores in fp32."""
        self.precision = precision
        for m in self.modules():
            if isinstance(m, FeatureExtractor):
                m.set_precision(precision)
        return self


def check_ranges(config, **ranges):
    """Raise ValueError unless each named setting lies in its [low, high] (NaN does not):
    a file's settings may be crafted, and a value far out of range (blur_sigma=1e6 makes
    every map flat) would pass every other check."""
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if value is not None and not all(low <= v <= high for v in (value if isinstance(value, tuple) else [value])):
            raise ValueError(f"{name}={value} is out of range: give {low}..{high}")


def check_layers(layers):
    """Backbone taps as a sorted tuple of distinct values from 1, 2, 3 (finest first)."""
    layers = tuple(sorted(set(layers)))
    if not layers or not set(layers) <= {1, 2, 3}:
        raise ValueError("layers must be one or more of 1, 2, 3")
    return layers

# -----------------------------------------------------------------------------
# PaDiM: a Gaussian per position, Mahalanobis distances


def oas_shrink(cov, n):
    """Oracle Approximating Shrinkage (Chen et al., IEEE TSP 2010, eq. 23) of sample
    covariances cov (P, d, d), the maximum-likelihood ones of n samples: (1 - rho) S +
    rho tr(S)/d I with rho from tr(S) and tr(S^2) alone, so it needs nothing beyond the
    sums PaDiM streams. With few samples S is rank-deficient and rho large; rho shrinks
    toward 0 as n grows. Returns the shrunk covariances (new tensor) and rho (P,)."""
    d = cov.shape[-1]
    tr = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr2 = cov.square().sum((-2, -1))  # tr(S^2) of a symmetric S
    num = (1 - 2 / d) * tr2 + tr.square()
    den = (n + 1 - 2 / d) * (tr2 - tr.square() / d)
    rho = torch.where(den > 0, num / den.clamp_min(torch.finfo(cov.dtype).tiny), torch.ones_like(den)).clamp(0, 1)
    shrunk = cov * (1 - rho)[:, None, None]
    shrunk.diagonal(dim1=-2, dim2=-1).add_((rho * tr / d)[:, None])
    return shrunk, rho


def mahalanobis(x, mean, cholesky):
    """Mahalanobis distances of x (P, d, B) to P Gaussians, mean (P, d) and the lower
    Cholesky factor L (P, d, d) of each covariance: |L^-1 (x - mu)|, by one batched
    triangular solve (no inverse is ever formed). Returns (P, B)."""
    z = torch.linalg.solve_triangular(cholesky, x - mean[..., None], upper=False)  # (P, d, B)
    return z.square().sum(1).sqrt()


# The least 1 - rho (OAS shrinkage) at which a PaDiM fitted without updatable gives its
# statistics back: they come back divided by it, so the fp32 rounding of the Cholesky
# factors (~1e-7) grows at most 1000-fold, to ~1e-4 of the covariance.
OAS_RECOVERABLE = 1e-3


@dataclass
class PaDiMConfig:
    backbone: str = "wide_resnet50_2"
    layers: tuple = (1, 2, 3)  # the paper concatenates layers 1-3 at layer 1's resolution
    # Random channels kept. The fitted state is a d x d Cholesky factor per layer-1
    # position (64 x 64 at 256 px): 4096 * d^2 * 4 bytes, 164 MB at d = 100. The paper's
    # d = 550 for WRN50 would make a 5 GB model; its ResNet18 value, 100, costs little
    # accuracy (README) and is used for every backbone.
    d: int = 100
    eps: float = 0.01  # covariance regularizer eps*I, the PaDiM reference code's value
    covariance: str = "sample"  # sample (eq. 1 of the paper) or oas: shrunk toward a scaled identity (oas_shrink)
    blur_sigma: float = BLUR_SIGMA
    # Keep fit's fp64 sums in the model, so that `fit --update` adds images bit for bit
    # (without them, it recovers the sums from the mean and Cholesky factors, to fp32
    # rounding). Off by default: they are P x d(d+1)/2 fp64, as large as the factors again.
    updatable: bool = False

    def __post_init__(self):
        self.layers = check_layers(self.layers)
        check_ranges(self, d=(1, 4096), eps=(0, 1e6), blur_sigma=(0, 32))
        if self.d < 1:
            raise ValueError("d must be a positive number of channels")
        if self.eps <= 0:
            raise ValueError("eps must be > 0 (it keeps the covariance invertible)")
        if self.covariance not in ("sample", "oas"):
            raise ValueError("covariance must be sample or oas")


class PaDiM(Detector):
    """PaDiM (arXiv:2011.08785). Every position of the layer-1 grid gets its own
    multivariate Gaussian over a random subset of d channels of the concatenated layer
    1-3 features. A patch's anomaly score is its Mahalanobis distance to the Gaussian of
    its position; the image score is the maximum of the smoothed map."""
    name = "padim"
    Config = PaDiMConfig

    def __init__(self, config, input_size=DEFAULT_IMAGE_SIZE, weights="imagenet"):
        super().__init__(config, input_size)
        self.backbone = FeatureExtractor(config.backbone, config.layers, weights)
        if config.d > sum(self.backbone.channels):
            raise ValueError(f"d={config.d} exceeds the {sum(self.backbone.channels)} channels of {config.backbone}")
        self.register_buffer("channels", torch.empty(0, dtype=torch.long))  # (d,) chosen channels
        self.register_buffer("mean", torch.empty(0))  # (P, d)
        self.register_buffer("cholesky", torch.empty(0))  # (P, d, d), lower triangular
        # fit's streamed statistics, only with updatable: n, and around the shift (P, d),
        # the sums (P, d) and the lower triangles of the sums of products (P, d(d+1)/2)
        self.register_buffer("stat_count", torch.tensor(0))
        self.register_buffer("stat_shift", torch.empty(0))
        self.register_buffer("stat_sum", torch.empty(0, dtype=torch.float64))
        self.register_buffer("stat_products", torch.empty(0, dtype=torch.float64))

    def fitted_shapes(self, state):
        P, d = math.prod(self.backbone.grids(self.input_size)[0]), self.config.d
        channels = state["channels"]
        C = sum(self.backbone.channels)
        if len(channels) == d and not bool(((channels >= 0) & (channels < C)).all()):
            raise ValueError("its PaDiM channel indices are out of range")
        stats = (P, d) if self.config.updatable else (0,)
        if self.config.updatable and int(state["stat_count"]) < 2:
            raise ValueError("its PaDiM statistics count fewer than 2 images")
        return super().fitted_shapes(state) | {
            "channels": (d,), "mean": (P, d), "cholesky": (P, d, d), "stat_shift": stats, "stat_sum": stats,
            "stat_products": (P, d * (d + 1) // 2) if self.config.updatable else (0,)}

    def embed(self, images):
        """images (B, 3, H, W) -> the chosen channels at layer-1 resolution (B, d, h, w)."""
        features = self.backbone(images)
        h, w = features[0].shape[-2:]
        parts, offset = [], 0
        for f in features:
            C = f.shape[1]
            own = self.channels[(self.channels >= offset) & (self.channels < offset + C)] - offset
            f = f[:, own]  # select before upsampling: only d channels ever reach full size
            parts.append(f if f.shape[-2:] == (h, w) else F.interpolate(f, size=(h, w), mode="nearest"))
            offset += C
        return torch.cat(parts, 1)

    @torch.no_grad()
    def fit(self, batches, seed=0):
        g = torch.Generator().manual_seed(seed)
        C = sum(self.backbone.channels)
        self.channels = torch.randperm(C, generator=g)[: self.config.d].sort().values.to(self.device)
        self.estimate(*self.accumulate(batches))

    @torch.no_grad()
    def update(self, batches, seed=0):
        # Chan et al.'s parallel merge of (n, mean, scatter) would do, but fit's own sums
        # around its own shift simply go on: the result is the fit on all the images,
        # bit for bit when the batches split the same way. Without them, the sums that the
        # mean and Cholesky factors imply go on instead (recovered_statistics).
        if not self.config.updatable:
            self.estimate(*self.accumulate(batches, *self.recovered_statistics()))
            return
        P, d = self.mean.shape
        i, j = torch.tril_indices(d, d, device=self.device)
        s2 = self.stat_products.new_empty(P, d, d)
        s2[:, i, j] = s2[:, j, i] = self.stat_products
        self.estimate(*self.accumulate(batches, int(self.stat_count), self.stat_shift[..., None],
                                       self.stat_sum[..., None].clone(), s2))

    def recovered_statistics(self):
        """The sums of accumulate (n, shift, s1, s2) that a model fitted without
        updatable implies, to the fp32 rounding of its mean and Cholesky factors: n is
        info["images"], the shift its mean (so s1 = 0), s2 the scatter that estimate
        turned into L L^T. Raises VadError when they cannot be recovered."""
        n = self.info.get("images")
        if type(n) is not int or n < 2:
            raise VadError("this PaDiM model's info does not say how many images it was fitted on, so images "
                           "cannot be added to it; fit it again")
        P, d = self.mean.shape
        cov = self.cholesky.double() @ self.cholesky.double().transpose(1, 2)  # (P, d, d)
        cov.diagonal(dim1=1, dim2=2).sub_(self.config.eps)
        if self.config.covariance == "sample":
            s2 = cov.mul_(n - 1)  # estimate divided by n - 1
        else:
            # OAS keeps the trace T and scales the traceless part A = S - T/d I by
            # r = 1 - rho, so S = T/d I + A_shrunk / r. rho = num/den (oas_shrink) with
            # tr(S^2) = T^2/d + |A_shrunk|^2 / r^2 is a quadratic in r:
            # K r^2 + c a r - n a = 0, with a = |A_shrunk|^2, c = n + 1 - 2/d and
            # K = T^2 (1 + (1 - 2/d)/d); its root in (0, 1], in the form that does not cancel.
            T = cov.diagonal(dim1=1, dim2=2).sum(-1)  # (P,)
            A = cov
            A.diagonal(dim1=1, dim2=2).sub_((T / d)[:, None])
            a = A.square().sum((1, 2))
            c, K = n + 1 - 2 / d, T.square() * (1 + (1 - 2 / d) / d)
            r = 2 * n * a / (c * a + (c * c * a * a + 4 * K * n * a).sqrt())
            # Where rho was ~1, S was all but replaced by T/d I and 1/r would multiply the
            # fp32 rounding of L past any use: refuse rather than add images to noise.
            lost = ~(r > OAS_RECOVERABLE)  # NaN where a = 0: S was replaced by T/d I outright
            if bool(lost.any()):
                raise VadError(f"this PaDiM model's OAS shrinkage is nearly total (rho > {1 - OAS_RECOVERABLE}) at "
                               f"{int(lost.sum())} of {P} positions, so its statistics cannot be "
                               f"recovered; fit it again with -s updatable=true")
            s2 = A.div_(r[:, None, None])
            s2.diagonal(dim1=1, dim2=2).add_((T / d)[:, None])
            s2.mul_(n)  # estimate divided by n
        shift = self.mean[..., None].clone()  # (P, d, 1)
        return n, shift, torch.zeros_like(shift, dtype=torch.float64), s2

    def accumulate(self, batches, n=0, shift=None, s1=None, s2=None):
        """Add the batches' features to the fp64 sums s1 (P, d, 1) of x - shift and s2
        (P, d, d) of its outer products, over n images so far (in place; shift: the
        first batch's mean when None). Returns (n, shift, s1, s2)."""
        for images in batches:
            x = self.embed(images.to(self.device))
            with timed("covariance", self.device):
                B, d, h, w = x.shape
                x = x.reshape(B, d, h * w).permute(2, 1, 0)  # (P, d, B)
                if shift is None:  # accumulate around a first estimate of the mean, for stability
                    shift = x.mean(2, keepdim=True)
                    s1 = torch.zeros_like(shift, dtype=torch.float64)  # (P, d, 1)
                    s2 = torch.zeros(h * w, d, d, dtype=torch.float64, device=x.device)  # (P, d, d)
                # One batch's centred products in fp32 (B terms: exact to ~1e-7), summed over
                # batches in fp64: the statistics of fp64 products at fp32 speed (README, "Speed").
                x = (x - shift).contiguous()
                s1 += x.sum(2, keepdim=True)
                s2 += torch.bmm(x, x.transpose(1, 2))
                n += B
        return n, shift, s1, s2

    def estimate(self, n, shift, s1, s2):
        """Each position's mean and the Cholesky factor of its covariance from the sums
        of accumulate (s2 is overwritten); kept too with updatable."""
        if n < 2:
            raise VadError("PaDiM needs at least 2 training images")
        P, d, _ = s2.shape
        if n <= d and self.config.covariance == "sample":
            warn(f"PaDiM fitted on {n} images for d={d} feature dimensions: each covariance is "
                 f"rank-deficient and held up by eps*I alone; use more than {d} normal images, or -s covariance=oas")
        with timed("covariance", self.device):
            i, j = torch.tril_indices(d, d, device=s2.device)
            if self.config.updatable:  # the lower triangles: cholesky reads no other
                self.stat_count, self.stat_shift = torch.tensor(n), shift[..., 0]
                self.stat_sum, self.stat_products = s1[..., 0], s2[:, i, j]
            if self.config.covariance == "oas":  # tr(S^2) reads the upper triangle too: take it from the lower
                s2[:, j, i] = s2[:, i, j]
            m = s1 / n
            if self.config.covariance == "oas":  # on the maximum-likelihood estimate, as Chen et al.
                cov, _ = oas_shrink(s2.sub_(n * m @ m.transpose(1, 2)).div_(n), n)
            else:
                cov = s2.sub_(n * m @ m.transpose(1, 2)).div_(n - 1)  # unbiased, as eq. 1 of the paper; in place
            cov.diagonal(dim1=1, dim2=2).add_(self.config.eps)
            self.mean = (m + shift.double())[..., 0].float()
            self.cholesky = torch.linalg.cholesky(cov).float()

    @torch.no_grad()
    def score(self, images):
        x = self.embed(images.to(self.device))
        B, d, h, w = x.shape
        with timed("mahalanobis", self.device):
            dist = mahalanobis(x.reshape(B, d, h * w).permute(2, 1, 0), self.mean, self.cholesky)  # (P, B)
        maps = upsample_and_blur(dist.T.reshape(B, h, w), self.input_size, self.config.blur_sigma)
        return maps.amax((1, 2)), maps

# -----------------------------------------------------------------------------
# PatchCore's memory bank: greedy coreset and exact nearest-neighbour search


def greedy_coreset(features, n, projection_dim=128, seed=0):
    """Indices of n rows of features (N, D), or of the concatenation of a list of such
    parts, chosen by greedy k-center selection (PatchCore sec. 3.2, Sener & Savarese
    2018): each pick is the point farthest from those already picked. Distances are
    taken after a seeded Gaussian random projection to `projection_dim` dims
    (Johnson-Lindenstrauss), as the reference code does; the start point is seeded too.
    Returns a LongTensor (n,) in pick order."""
    parts = list(features) if isinstance(features, (list, tuple)) else [features]
    N, D = sum(len(p) for p in parts), parts[0].shape[1]
    g = torch.Generator().manual_seed(seed)
    if projection_dim and D > projection_dim:
        P = torch.randn(D, projection_dim, generator=g, dtype=parts[0].dtype) / math.sqrt(projection_dim)
        x = torch.cat([p @ P.to(p.device) for p in parts])  # (N, k); the parts are never joined in full
    else:
        x = torch.cat(parts)
    start = int(torch.randint(N, (1,), generator=g))
    # Centering changes no distance but shrinks the norms, so |a|^2 - 2ab + |b|^2 cancels less.
    x = (x - x.mean(0)).cpu().numpy()
    return torch.from_numpy(greedy_kcenter(x, n, start))


def greedy_kcenter(x, n, start, frontier=2048, batch=200):
    """Exact greedy k-center on the rows of x (N, r), numpy: picks[0] = start, then each
    pick is the row with the largest squared distance to its nearest earlier pick.

    The plain algorithm streams all N rows once per pick. Here the running minima of all
    rows are brought up to date only every `batch` picks, by matrix products with those
    picks, and only for rows that the triangle inequality cannot rule out (a row can come
    closer to pick q only if q lies within twice its current distance of its nearest
    pick). In between, the `frontier` rows with the largest, possibly stale, minima are
    updated after every pick. Minima only shrink, so a stale value bounds a row from
    above: while the best frontier row beats every bound outside the frontier it is the
    true farthest row. The picks are the plain algorithm's, up to floating-point ties.
    (numpy, not torch: this loop is latency-bound and numpy's small ops are far cheaper.)
    """
    N = len(x)
    n = min(n, N)
    sq = np.einsum("ij,ij->i", x, x)
    mind = np.full(N, np.inf, dtype=x.dtype)  # squared distance to the nearest applied pick
    near = np.zeros(N, dtype=np.int64)  # that pick's position in `picks`
    picks = np.empty(n, dtype=np.int64)
    done, front, p = 0, None, start  # picks[:done] are applied to every row
    for i in progress(range(n), n, "coreset"):
        picks[i] = p
        if front is not None:  # keep the frontier exact
            d = f_sq - 2 * (f_x @ x[p]) + sq[p]
            closer = d < f_mind
            f_mind[closer], f_near[closer] = d[closer], i
            j = int(f_mind.argmax())
        if front is None or f_mind[j] < bound or i + 1 - done >= batch:
            if front is not None:
                mind[front], near[front] = f_mind, f_near
            _apply_picks(x, sq, mind, near, picks, done, i + 1)
            done = i + 1
            k = min(frontier, N)
            order = np.argpartition(mind, N - k - 1) if k < N else np.arange(N)  # order[N-k-1] in place
            front, bound = order[N - k:], (mind[order[N - k - 1]] if k < N else -np.inf)
            f_x, f_sq, f_mind, f_near = x[front], sq[front], mind[front], near[front]  # copies
            j = int(f_mind.argmax())
        p = int(front[j])
    return picks


def _apply_picks(x, sq, mind, near, picks, done, upto, chunk=4096):
    """Lower mind/near of every row that picks[done:upto] can bring closer (in place)."""
    new = picks[done:upto]
    P, p_sq = -2 * x[new].T, sq[new]  # (r, m), (m,)
    if done == 0:
        rows = np.arange(len(x))
    else:
        old = picks[:done]
        to_new = (sq[old][:, None] + x[old] @ P + p_sq).min(1)  # squared distance of each old pick to the nearest new one
        to_new = np.r_[to_new, np.full(len(new), np.inf, dtype=x.dtype)]  # rows already nearest a new pick are exact
        # triangle inequality with a margin for rounding: the margin only adds rows
        rows = np.flatnonzero(to_new[near] < 4 * (1 + 1e-3) * mind + 1e-6 * sq.mean())
    for a in range(0, len(rows), chunk):
        r = rows[a: a + chunk]
        d = x[r] @ P + p_sq  # (c, m): squared distance minus |x_r|^2
        k = d.argmin(1)
        d = d[np.arange(len(r)), k] + sq[r]
        closer = d < mind[r]
        mind[r[closer]], near[r[closer]] = d[closer], done + k[closer]


def ranking_distances(queries, rows, rows_sq):
    """|q - b|^2 - |q|^2 = |b|^2 - 2 q.b for every query (M, D) and row (K, D), given
    rows_sq = |b|^2 (K,): one fused product (M, K). |q|^2 is the same along a row of the
    result, so it ranks the rows for each query as the full distance does."""
    return torch.addmm(rows_sq, queries, rows.T, alpha=-2)


def nearest_neighbors(queries, bank, k=1):
    """k nearest rows of bank (K, D) for each of queries (M, D), by Euclidean distance.

    Candidates come from one matrix product per block of queries,
    |q - b|^2 = |q|^2 - 2 q.b + |b|^2, with blocks sized so that a block's distance
    matrix fits in CHUNK_BYTES. Returns (distances (M, k), indices (M, k)), nearest first.
    """
    M, K = len(queries), len(bank)
    k = min(k, K)
    bank_sq = torch.linalg.vector_norm(bank, dim=1).square()  # no (K, D) temporary, unlike (b * b).sum(1)
    rows = max(1, CHUNK_BYTES // (4 * K))
    dists, index = [], []
    for a in range(0, M, rows):
        q = queries[a: a + rows]
        d2 = ranking_distances(q, bank, bank_sq)
        i = d2.argmin(1, keepdim=True) if k == 1 else d2.topk(k, dim=1, largest=False).indices
        # The expansion cancels badly for near neighbours; recompute the k winners directly.
        dists.append((q[:, None] - bank[i]).norm(dim=2))
        index.append(i)
    return torch.cat(dists), torch.cat(index)


def voronoi_cells(bank, n, iters=10, seed=0):
    """Split the rows of bank (K, D) into at most n Voronoi cells for cell_search: k-means
    (Lloyd) on an even sample of about 32 rows per cell from seeded farthest-point
    starts, then every row assigned to its nearest centre in fp64 (cell_search's bounds
    need each row inside its centre's cell). Returns (order (K,): the rows grouped by
    cell, centres (c, D), starts (c + 1,): cell j holds bank[order][starts[j]:starts[j + 1]],
    radii (c,): each cell's largest distance from its centre); centres left without rows
    are dropped."""
    K = len(bank)
    n = max(1, min(n, K))
    sample = bank[::max(1, K // (32 * n))]
    centres = sample[greedy_coreset(sample, n, seed=seed).to(bank.device)].clone()
    for _ in range(iters if n > 1 else 0):
        cell = ranking_distances(sample, centres, torch.linalg.vector_norm(centres, dim=1).square()).argmin(1)
        counts = torch.bincount(cell, minlength=n)
        filled = counts > 0
        centres[filled] = torch.zeros_like(centres).index_add_(0, cell, sample)[filled] / counts[filled, None]
    rows = max(1, CHUNK_BYTES // (8 * max(n, bank.shape[1])))  # fp64 rows and their distances
    c64 = centres.double()
    c64_sq = torch.linalg.vector_norm(c64, dim=1).square()
    cell = torch.cat([ranking_distances(bank[a: a + rows].double(), c64, c64_sq).argmin(1) for a in range(0, K, rows)])
    counts = torch.bincount(cell, minlength=n)
    filled = counts > 0  # a row's nearest centre stays its nearest when unused centres go
    cell, centres, counts = (filled.cumsum(0) - 1)[cell], centres[filled].contiguous(), counts[filled]
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    radii = bank.new_zeros(len(centres)).scatter_reduce_(
        0, cell, torch.linalg.vector_norm(bank - centres[cell], dim=1), "amax")
    return torch.argsort(cell, stable=True), centres, starts, radii


def _search_cells(queries, bank, bank_sq, starts, mask):
    """Nearest row of bank for each query among the cells marked in mask (M, c), in the
    expanded form |b|^2 - 2 q.b: returns (that value (M,), row (M,)), inf and -1 for a
    query with no cell marked. One matrix product per cell, with the queries that visit it;
    starts is a list."""
    cells, rows = mask.T.nonzero().unbind(1)  # grouped by cell
    found = bank.new_empty(len(rows))
    index = torch.empty(len(rows), dtype=torch.long, device=bank.device)
    a = 0
    for j, k in enumerate(torch.bincount(cells, minlength=len(starts) - 1).tolist()):
        if k:
            s, e = starts[j], starts[j + 1]
            found[a: a + k], index[a: a + k] = ranking_distances(queries.index_select(0, rows[a: a + k]),
                                                                 bank[s:e], bank_sq[s:e]).min(1)
            index[a: a + k] += s
            a += k
    best = bank.new_full((len(queries),), math.inf).scatter_reduce_(0, rows, found, "amin")
    nearest = torch.full((len(queries),), -1, dtype=torch.long, device=bank.device)
    won = found == best[rows]
    nearest[rows[won]] = index[won]
    return best, nearest


def _distances(queries, rows, block=1024):
    """|queries[i] - rows[i]| for each i, computed directly; in blocks that stay in cache."""
    return torch.cat([torch.linalg.vector_norm(queries[a: a + block] - rows[a: a + block], dim=1, keepdim=True)
                      for a in range(0, len(queries), block)] or [queries.new_empty(0, 1)])


def cell_search(queries, bank, centres, starts, radii, probe=1):
    """Nearest row of bank (K, D), its rows grouped into Voronoi cells by voronoi_cells,
    for each of queries (M, D): exact, as nearest_neighbors(queries, bank, 1), but most
    cells are never visited (an inverted file, Jegou et al. 2011, made exact). Centre
    the bank first: every fp32 distance here cancels less.

    Each query first visits the cells of its `probe` nearest centres. A row b of another
    cell c is closer to c than to the query's nearest centre m, so it lies beyond their
    bisecting plane, |q - b| >= (|q - c|^2 - |q - m|^2) / (2 |c - m|), and within c's
    radius of c, |q - b| >= |q - c| - r_c; cell c is visited too unless a bound beats
    the distance found. With slack for fp32 rounding, the result is the exhaustive
    search's up to floating-point ties. Returns (distances (M, 1), indices (M, 1)),
    the winner's distance computed directly."""
    M, D = queries.shape
    largest = int((starts[1:] - starts[:-1]).max())
    starts = starts.tolist()
    c_norm = torch.linalg.vector_norm(centres, dim=1)
    gaps = torch.cdist(centres.double(), centres.double()).float()  # fp64: exact enough through the expansion
    bank_sq = torch.linalg.vector_norm(bank, dim=1).square()
    slack = 2 * (D + 2) * torch.finfo(torch.float32).eps  # bounds an fp32 dot product's relative error
    rows = max(1, CHUNK_BYTES // (4 * max(4 * len(centres), largest)))  # the (rows, n) bounds, a cell's distances
    dists, index = [], []
    for a in range(0, M, rows):
        q = queries[a: a + rows]
        q_norm = torch.linalg.vector_norm(q, dim=1, keepdim=True)
        to_centre = ranking_distances(q, centres, c_norm.square()) + q_norm.square()  # |q - c|^2 (m, n)
        visit = torch.zeros_like(to_centre, dtype=torch.bool)
        visit.scatter_(1, to_centre.topk(min(probe, len(centres)), dim=1, largest=False).indices, True)
        found, nearest = _search_cells(q, bank, bank_sq, starts, visit)
        d = _distances(q, bank.index_select(0, nearest))
        reach = (1 + 1e-4) * d  # with slack for rounding
        error = slack * (q_norm + c_norm).square()  # of each to_centre
        m = to_centre.argmin(1, keepdim=True)
        beyond_plane = to_centre - to_centre.gather(1, m) - error - error.gather(1, m) > 2 * gaps[m[:, 0]] * reach
        beyond_ball = (to_centre - error).clamp_min(0).sqrt() > reach + (1 + 1e-4) * radii
        more = ~(visit | beyond_plane | beyond_ball)
        if more.any():
            found2, nearest2 = _search_cells(q, bank, bank_sq, starts, more)
            better = found2 < found
            nearest[better] = nearest2[better]
            d[better] = _distances(q[better], bank.index_select(0, nearest2[better]))
        dists.append(d)
        index.append(nearest[:, None])
    return torch.cat(dists), torch.cat(index)

# -----------------------------------------------------------------------------
# PatchCore


@dataclass
class PatchCoreConfig:
    backbone: str = "wide_resnet50_2"
    layers: tuple = (2, 3)  # mid-level features: generic enough, still local (paper sec. 3.1)
    coreset_ratio: float = 0.1  # the paper's 10% memory bank; 1.0 keeps every patch
    projection_dim: int = 128  # coreset distances after a random projection, as the reference code
    num_neighbors: int = 9  # b in eq. 7, the reference code's default
    embed_dim: typing.Optional[int] = None  # pool patch features to this many dims (reference: 1024)
    search_cells: int = 0  # Voronoi cells of the bank for the (exact) search; 0: sqrt(bank size)
    search_probe: int = 1  # cells a patch visits first; others only if they could hold a nearer row
    blur_sigma: float = BLUR_SIGMA

    def __post_init__(self):
        self.layers = check_layers(self.layers)
        check_ranges(self, num_neighbors=(1, 1024), search_cells=(0, 2**20), search_probe=(1, 2**20),
                     projection_dim=(0, 4096), embed_dim=(1, 8192), blur_sigma=(0, 32))
        if self.search_cells < 0 or self.search_probe < 1:
            raise ValueError("search_cells must be >= 0 and search_probe >= 1")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError("coreset_ratio must be in (0, 1]")
        if self.num_neighbors < 1:
            raise ValueError("num_neighbors must be >= 1")
        if self.projection_dim < 0 or (self.embed_dim is not None and self.embed_dim < 1):
            raise ValueError("projection_dim must be >= 0 and embed_dim >= 1")


class PatchCore(Detector):
    """PatchCore (arXiv:2106.08265). Locally averaged mid-level patch features of all
    normal images form a memory bank, thinned by greedy coreset selection to a few
    percent. A test patch scores its distance to the nearest bank entry; the image score
    is the largest patch score, reweighted by how isolated its nearest entry is (eq. 7)."""
    name = "patchcore"
    Config = PatchCoreConfig

    def __init__(self, config, input_size=DEFAULT_IMAGE_SIZE, weights="imagenet"):
        super().__init__(config, input_size)
        self.backbone = FeatureExtractor(config.backbone, config.layers, weights)
        self.register_buffer("memory_bank", torch.empty(0))  # (K, C), less bank_origin, grouped by cell
        self.register_buffer("bank_origin", torch.empty(0))  # (C,) the bank's mean
        self.register_buffer("cell_centres", torch.empty(0))  # (n, C)
        self.register_buffer("cell_starts", torch.empty(0, dtype=torch.long))  # (n + 1,)
        self.register_buffer("cell_radii", torch.empty(0))  # (n,)
        # What `fit --update` needs to go on as fit would: the bank's rows in the order fit
        # made them (memory_bank[j] is row bank_order[j]) and how many parts it thinned.
        self.register_buffer("bank_order", torch.empty(0, dtype=torch.long))  # (K,)
        self.register_buffer("bank_parts", torch.tensor(0))

    def fitted_shapes(self, state):
        D = self.config.embed_dim or sum(self.backbone.channels)
        K, n = len(state["memory_bank"]), len(state["cell_centres"])
        starts, order = state["cell_starts"], state["bank_order"]
        if K < 1 or n < 1 or len(starts) != n + 1 or int(starts[0]) != 0 or int(starts[-1]) != K \
                or not bool((starts[1:] > starts[:-1]).all()):  # voronoi_cells drops empty cells
            raise ValueError("its PatchCore memory bank or cells are inconsistent")
        if len(order) == K and not (bool(((order >= 0) & (order < K)).all())
                                    and bool((torch.bincount(order, minlength=K) == 1).all())):
            raise ValueError("its PatchCore bank order is not a permutation of the bank's rows")
        if not (bool((state["cell_radii"] >= 0).all()) and 0 <= int(state["bank_parts"]) <= 2**20):
            raise ValueError("its PatchCore cell radii or part count are out of range")
        return super().fitted_shapes(state) | {
            "memory_bank": (K, D), "bank_origin": (D,), "cell_centres": (n, D), "cell_starts": (n + 1,),
            "cell_radii": (n,), "bank_order": (K,)}

    def embed(self, images):
        """images (B, 3, H, W) -> patch features (B, C, h, w) on the first layer's grid, a view of
        channels-last memory (so that .permute(0, 2, 3, 1) is one row per patch, no copy)."""
        features = self.backbone(images, channels_last=True)
        B, (h, w) = len(images), features[0].shape[-2:]
        # Channels last throughout: CPU pooling and resampling are faster on it (README,
        # "Speed"), and the bank wants one row per patch.
        x = features[0].new_empty(B, h, w, sum(f.shape[1] for f in features))
        c = 0
        for f in features:
            # 3x3 neighbourhood average (sec. 3.1, p = 3), zero padded as in the reference
            # code (excluding the padding measured 0.001 lower pixel AUROC on bottle).
            f = F.avg_pool2d(f.contiguous(memory_format=torch.channels_last), 3, 1, 1)
            if f.shape[-2:] != (h, w):
                f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            x[..., c: c + f.shape[1]] = f.permute(0, 2, 3, 1)
            c += f.shape[1]
        x = x.permute(0, 3, 1, 2)
        if self.config.embed_dim:
            B, C, h, w = x.shape
            x = x.permute(0, 2, 3, 1).reshape(-1, 1, C)
            x = F.adaptive_avg_pool1d(x, self.config.embed_dim).reshape(B, h, w, -1).permute(0, 3, 1, 2)
        return x

    def coreset(self, parts, seed):
        """The coreset rows of the concatenation of parts, a list of (n_i, C) tensors."""
        if self.config.coreset_ratio == 1:
            return torch.cat(parts)
        n = max(1, math.ceil(self.config.coreset_ratio * sum(len(p) for p in parts)))
        with timed("coreset", self.device):
            picks = greedy_coreset(parts, n, self.config.projection_dim, seed).to(self.device)
            ends = torch.tensor([len(p) for p in parts], device=self.device).cumsum(0)
            part = torch.searchsorted(ends, picks, right=True)
            rows = parts[0].new_empty(len(picks), parts[0].shape[1])
            for j, p in enumerate(parts):
                mine = part == j
                rows[mine] = p[picks[mine] - (ends[j] - len(p))]
            return rows

    @torch.no_grad()
    def fit(self, batches, seed=0):
        self.index(*self.thin(batches, seed), seed)

    @torch.no_grad()
    def update(self, batches, seed=0):
        # The new patches are thinned in parts of their own, seeded as fit would seed its
        # next parts, and join the bank: the fit on all the images whenever that fit would
        # have closed a part where the old images end (always at coreset_ratio=1). Else it
        # is still a union of coresets of parts, as a fit over PART_ROWS or BANK_BYTES makes.
        old = torch.empty_like(self.memory_bank)
        old[self.bank_order] = self.memory_bank
        old += self.bank_origin  # the rows fit picked, to fp32 rounding (the bank is stored centred)
        new, parts = self.thin(batches, seed, int(self.bank_parts))
        self.index(torch.cat([old, new]), parts, seed)

    def thin(self, batches, seed, parts=0):
        """The coreset rows of the batches' patches (n, C), and the count of parts
        thinned, `parts` of them before these."""
        # Patches pile up until PART_ROWS or BANK_BYTES, are thinned to coreset_ratio, and
        # the next ones pile up afresh: the bank is then a union of coresets of consecutive
        # parts, which k-center coresets allow (Indyk et al., "Composable core-sets", PODS
        # 2014), fit time grows linearly with the images and memory stays bounded however
        # many there are. Under both (bottle and KolektorSDD at 256 px, even with WRN50) it
        # is one coreset of everything.
        thinned, raw, size, rows = [], [], 0, 0
        for images in batches:
            x = self.embed(images.to(self.device)).permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, C)
            raw.append(x)
            size, rows = size + x.numel() * x.element_size(), rows + len(x)
            if (size > BANK_BYTES or rows > PART_ROWS) and self.config.coreset_ratio < 1:
                thinned.append(self.coreset(raw, seed + parts + len(thinned)))
                raw, size, rows = [], 0, 0
        if raw:
            thinned.append(self.coreset(raw, seed + parts + len(thinned)))
        return torch.cat(thinned), parts + len(thinned)

    def index(self, bank, parts, seed):
        """Keep bank (K, C), made of `parts` thinned parts, centred and grouped into its
        search cells (bank is overwritten)."""
        # Centred, |q|^2 - 2 q.b + |b|^2 cancels far less: WRN50 patches have norms near
        # 450 but lie 7 apart, and the search then agrees with an fp64 one where uncentred
        # fp32 picked a farther row for 1 patch in 1,000.
        self.bank_origin = bank.mean(0)
        bank -= self.bank_origin
        with timed("search", self.device):
            n = self.config.search_cells or round(math.sqrt(len(bank)))
            order, self.cell_centres, self.cell_starts, self.cell_radii = voronoi_cells(bank, n, seed=seed)
            self.memory_bank = bank[order]
        self.bank_order, self.bank_parts = order, torch.tensor(parts)

    @torch.no_grad()
    def score(self, images):
        x = self.embed(images.to(self.device))
        B, C, h, w = x.shape
        patches = x.permute(0, 2, 3, 1).reshape(B * h * w, C)  # a view of embed's own buffer
        patches -= self.bank_origin
        with timed("search", self.device):
            dist, nearest = cell_search(patches, self.memory_bank, self.cell_centres, self.cell_starts,
                                        self.cell_radii, self.config.search_probe)
        dist, nearest = dist.reshape(B, h * w), nearest.reshape(B, h * w)
        maps = upsample_and_blur(dist.reshape(B, h, w), self.input_size, self.config.blur_sigma)
        # Eq. 7: the worst patch m_test* scores s* = |m_test* - m*|, times 1 - softmax weight
        # of m* among its b nearest bank neighbours N_b(m*): an isolated m* is trusted less.
        b = torch.arange(B, device=x.device)
        worst = dist.argmax(1)
        s_star = dist[b, worst]
        if min(self.config.num_neighbors, len(self.memory_bank)) < 2:
            return s_star, maps
        m_test = patches.reshape(B, h * w, C)[b, worst]  # (B, C)
        m_star = self.memory_bank[nearest[b, worst]]  # (B, C)
        with timed("search", self.device):
            _, support = nearest_neighbors(m_star, self.memory_bank, self.config.num_neighbors)  # (B, b)
        d = (m_test[:, None] - self.memory_bank[support]).norm(dim=2)  # (B, b)
        weight = 1 - torch.exp(s_star - torch.logsumexp(d, 1))
        return weight * s_star, maps

# -----------------------------------------------------------------------------
# Detectors that train: augmentation, the training loop, fused maps


def augment(images, g, rotate=0.0, flip=False, jitter=0.0):
    """Seeded random augmentation of a batch (B, 3, H, W) in [0, 1]: rotation by up to
    `rotate` degrees (borders mirrored), horizontal and vertical flips, and brightness,
    contrast and saturation each scaled by a factor in [1 - jitter, 1 + jitter]."""
    B = len(images)
    x = images
    if rotate:
        angle = (torch.rand(B, generator=g) * 2 - 1) * math.radians(rotate)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(B)], 1),
                             torch.stack([sin, cos, torch.zeros(B)], 1)], 1).to(x)
        grid = F.affine_grid(theta, x.shape, align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if flip:
        h, v = torch.rand(B, generator=g) < 0.5, torch.rand(B, generator=g) < 0.5
        x = torch.where(h.view(B, 1, 1, 1).to(x.device), x.flip(3), x)
        x = torch.where(v.view(B, 1, 1, 1).to(x.device), x.flip(2), x)
    if jitter:
        b, c, s = (1 + (torch.rand(3, B, 1, 1, 1, generator=g) * 2 - 1) * jitter).to(x)
        x = x * b
        x = (x - x.mean((1, 2, 3), keepdim=True)) * c + x.mean((1, 2, 3), keepdim=True)
        grey = x.mean(1, keepdim=True)
        x = (x - grey) * s + grey
    return x.clamp(0, 1)


def train_autocast(device, precision):
    """Autocast for a training step: on only when the user asked for bf16 or fp16
    (--precision), never because of what the CPU happens to support, so one command makes
    one model on any machine. Weights and optimizer state stay fp32."""
    half = HALF_TYPES.get(precision)
    return torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None)


def train_loop(parameters, epochs, lr_at, steps, precision="fp32"):
    """Adam over `epochs`, the rate set by lr_at(epoch) at each epoch's start.
    steps(epoch) yields (loss, batch size) for each batch: its forward pass; the
    backward pass and the update happen here. Shows the epoch, the mean loss and the time
    left."""
    parameters = list(parameters)
    optimizer = torch.optim.Adam(parameters, lr=lr_at(0))
    # fp16 gradients underflow without loss scaling; bf16 keeps fp32's range and needs none
    scaler = torch.amp.GradScaler(parameters[0].device.type, enabled=precision == "fp16")
    last = [float("nan")]
    for epoch in progress(range(epochs), epochs, "train", lambda: f"loss {last[0]:.4f}"):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch)
        total = count = 0
        with timed("training"):
            for loss, size in steps(epoch):
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total, count = total + float(loss.detach()) * size, count + size
        last[0] = total / count


def check_image_score(config):
    """image_score is max or topk (the mean of the top_k map values), top_k >= 1."""
    if config.image_score not in ("max", "topk") or not 1 <= config.top_k <= MAX_PIXELS:
        raise ValueError(f"image_score must be max or topk, and top_k 1..{MAX_PIXELS}")


def top_k_mean(maps, k):
    """Mean of the k largest values of each map (B, H, W) -> (B,); k = 1 is the maximum."""
    return maps.flatten(1).topk(min(k, maps[0].numel()), dim=1).values.mean(1)


class FusedMapDetector(Detector):
    """A detector whose map sums several component maps (B, K, H, W) from
    component_maps(), each standardized with statistics of held-out normal images so
    that components on different scales can be added."""

    def __init__(self, config, input_size, components):
        super().__init__(config, input_size)
        self.register_buffer("map_mean", torch.zeros(components))  # per component, held-out images
        self.register_buffer("map_std", torch.ones(components))

    def component_maps(self, images):
        """images (B, 3, H, W) -> component maps (B, K, H, W), before standardization."""
        raise NotImplementedError

    @torch.no_grad()
    def fit_normalization(self, batches):
        maps = torch.cat([self.component_maps(b.to(self.device)) for b in batches])  # (N, K, H, W)
        self.map_mean = maps.mean((0, 2, 3))
        self.map_std = maps.std((0, 2, 3)).clamp_min(1e-12)

    def blurred(self, maps):
        """Component maps, each (B, h, w) -> upsampled to the input size, blurred, stacked (B, K, H, W)."""
        return torch.stack([upsample_and_blur(m, self.input_size, self.config.blur_sigma) for m in maps], 1)

    def standardized(self, maps):
        return (maps - self.map_mean.view(1, -1, 1, 1)) / self.map_std.view(1, -1, 1, 1)

    def image_scores(self, maps):
        return top_k_mean(maps, self.config.top_k if self.config.image_score == "topk" else 1)

    def map_score(self, anomaly_map):
        return float(self.image_scores(anomaly_map.reshape(1, 1, -1))[0])

# -----------------------------------------------------------------------------
# EfficientAD


@dataclass
class EfficientADConfig:
    backbone: str = "wide_resnet50_2"  # the frozen teacher
    layers: tuple = (1, 2, 3)  # the report's three scales (sec. 4.3.1)
    student_weights: str = "none"  # ResNet-18 student: random init as in EfficientAD, or "imagenet"/PATH
    epochs: int = 30  # the report trains 100; see the README for what fewer costs
    lr: float = 1e-3  # Adam, divided by 10 after lr_drop of the epochs (report: 80 of 100)
    lr_drop: float = 0.8
    batch_size: int = 8
    hard_quantile: float = 0.0  # 0: plain MSE (report); 0.999: EfficientAD's hard-feature loss
    augment_pool: int = 4  # versions of each image (the first unaugmented) with cached teacher targets
    rotate: float = 10.0  # augmentation: degrees, flips, colour jitter (report sec. 4.3.3)
    flip: bool = True
    jitter: float = 0.1
    fusion: str = "normalized"  # each scale standardized before the sum (measured best on bottle); raw: plain sum
    image_score: str = "max"  # max, or topk: the mean of the top_k map values
    top_k: int = 100
    blur_sigma: float = BLUR_SIGMA

    def __post_init__(self):
        self.layers = check_layers(self.layers)
        check_image_score(self)
        check_ranges(self, epochs=(1, 100_000), lr=(0, 1), batch_size=(1, 4096), augment_pool=(1, 64),
                     rotate=(0, 180), jitter=(0, 1), blur_sigma=(0, 32))
        if self.epochs < 1 or self.batch_size < 1 or self.augment_pool < 1:
            raise ValueError("epochs, batch_size and augment_pool must be >= 1")
        if not 0 <= self.hard_quantile < 1 or not 0 < self.lr_drop <= 1:
            raise ValueError("hard_quantile must be in [0, 1) and lr_drop in (0, 1]")
        if self.fusion not in ("raw", "normalized"):
            raise ValueError("fusion must be raw or normalized")


class EfficientAD(FusedMapDetector):
    """Multi-scale student-teacher distillation, as the report builds EfficientAD (its
    sec. 4.3; Batzner et al., arXiv:2303.14535). A ResNet-18 student, through 1x1 linear
    adapters, learns to reproduce the frozen pretrained teacher's normalized features at
    three scales on normal images only; where it fails, the image is anomalous. The map
    fuses the per-scale squared errors. Deviation from the original EfficientAD: no
    autoencoder branch and a ResNet student, as in the report."""
    name = "efficientad"
    Config = EfficientADConfig

    def __init__(self, config, input_size=DEFAULT_IMAGE_SIZE, weights="imagenet"):
        super().__init__(config, input_size, components=len(config.layers))
        self.teacher = FeatureExtractor(config.backbone, config.layers, weights)
        student_weights = "empty" if weights == "empty" else config.student_weights
        try:
            self.student = FeatureExtractor("resnet18", config.layers, student_weights, frozen=False)
        except VadError as e:
            raise VadError(f"student: {e}".replace("--weights ", "-s student_weights=")) from None
        self.adapters = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(self.student.channels, self.teacher.channels))
        C = sum(self.teacher.channels)
        self.register_buffer("teacher_mean", torch.zeros(C))  # per channel, over the training images
        self.register_buffer("teacher_std", torch.ones(C))

    def normalize(self, features):
        """Teacher features, one (B, C_l, h_l, w_l) per scale, standardized per channel."""
        means = self.teacher_mean.split(self.teacher.channels)
        stds = self.teacher_std.split(self.teacher.channels)
        return [(f.float() - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1) for f, m, s in zip(features, means, stds)]

    def targets(self, images):
        return self.normalize(self.teacher(images))

    def predictions(self, images):
        return [adapt(f) for adapt, f in zip(self.adapters, self.student(images))]

    def loss(self, targets, predictions):
        """Sum over scales of the mean squared error (report eq. 4.4); with hard_quantile q,
        only errors above their q-quantile count (EfficientAD's hard-feature loss)."""
        total = 0
        for t, p in zip(targets, predictions):
            e = (t.float() - p.float()).square()
            if self.config.hard_quantile:
                flat = e.flatten()
                # torch.quantile is limited to 16M elements; kthvalue gives the same order statistic
                k = max(1, int(math.ceil(self.config.hard_quantile * flat.numel())))
                e = flat[flat >= flat.kthvalue(k).values]
            total = total + e.mean()
        return total

    def fit(self, batches, seed=0):
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        images = torch.cat([(b * 255).round().to(torch.uint8) for b in batches])  # (N, 3, H, W), kept as bytes
        N = len(images)
        # One teacher pass over a pool of versions of each image (the first unaugmented):
        # the targets are computed once, not every epoch; stored in bf16, normalized per
        # channel with statistics of the unaugmented images when a batch is drawn.
        pool, features, s1, s2 = [], [[] for _ in cfg.layers], 0, 0
        with torch.no_grad():
            for v in progress(range(cfg.augment_pool), cfg.augment_pool, "teacher"):
                for a in range(0, N, cfg.batch_size):
                    x = images[a: a + cfg.batch_size].float() / 255
                    if v:
                        x = augment(x, g, cfg.rotate, cfg.flip, cfg.jitter)
                    pool.append((x * 255).round().to(torch.uint8))
                    f = self.teacher(x.to(self.device))
                    for store, t in zip(features, f):
                        store.append(t.to(torch.bfloat16))
                    if v == 0:  # per channel of each scale: sums over images and positions
                        s1 = s1 + torch.cat([t.double().mean((2, 3)).sum(0) for t in f])
                        s2 = s2 + torch.cat([t.double().square().mean((2, 3)).sum(0) for t in f])
        self.teacher_mean = (s1 / N).float()
        self.teacher_std = (s2 / N - (s1 / N) ** 2).clamp_min(1e-12).sqrt().float()
        pool = torch.cat(pool).view(cfg.augment_pool, N, *images.shape[1:])
        features = [torch.cat(f).view(cfg.augment_pool, N, *f[0].shape[1:]) for f in features]
        def steps(epoch):  # each image once per epoch, in a random one of its versions
            order, version = torch.randperm(N, generator=g), torch.randint(cfg.augment_pool, (N,), generator=g)
            for a in range(0, N, cfg.batch_size):
                i, v = order[a: a + cfg.batch_size], version[order[a: a + cfg.batch_size]]
                x = (pool[v, i].to(self.device).float() / 255).contiguous(memory_format=torch.channels_last)
                targets = self.normalize([f[v, i].to(self.device) for f in features])
                with train_autocast(self.device, self.precision):
                    yield self.loss(targets, self.predictions(x)), len(i)

        # Train student and adapters: lr / 10 after lr_drop of the epochs (report: 80 of 100).
        drop = max(1, round(cfg.lr_drop * cfg.epochs))
        self.student.train()
        self.student.to(memory_format=torch.channels_last)  # oneDNN trains convolutions faster in this layout
        train_loop(list(self.student.parameters()) + list(self.adapters.parameters()), cfg.epochs,
              lambda epoch: cfg.lr if epoch < drop else cfg.lr / 10, steps, self.precision)
        self.student.eval()
        self.student.to(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def component_maps(self, images):
        """Per-scale squared errors, channel-averaged, upsampled and blurred -> (B, L, H, W)."""
        maps = [(t - p).square().mean(1) for t, p in zip(self.targets(images), self.predictions(images))]
        return self.blurred(maps)

    @torch.no_grad()
    def score(self, images):
        maps = self.component_maps(images.to(self.device))
        if self.config.fusion == "normalized":  # report sec. 4.3.4: standardize each scale before fusing
            maps = self.standardized(maps)
        maps = maps.sum(1)
        return self.image_scores(maps), maps

# -----------------------------------------------------------------------------
# Autoencoder and SSIM


@functools.lru_cache(maxsize=8)
def gaussian_window(channels, size=11, sigma=1.5):
    """The SSIM paper's 11x11 Gaussian window (sigma 1.5), as a (channels, 1, 11, 11)
    kernel for a grouped convolution. Cached: built once, it is a constant to an ONNX
    trace, not operations whose shape depends on the input's (export)."""
    k = gaussian_kernel(sigma, truncate=(size // 2) / sigma)
    return (k[:, None] * k[None, :]).float()[None, None].expand(channels, 1, -1, -1)


def ssim_map(x, y, data_range=1.0):
    """Per-pixel SSIM of images x, y (B, C, H, W) (Wang et al. 2004: 11x11 Gaussian
    window, sigma 1.5, K1 = 0.01, K2 = 0.03), averaged over channels -> (B, H, W).
    Borders are mirrored (scipy.ndimage mode="mirror")."""
    B, C, H, W = x.shape
    w = gaussian_window(int(C)).to(x)
    r = w.shape[-1] // 2

    def filt(z):
        return F.conv2d(F.pad(z, (r, r, r, r), mode="reflect"), w, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(1)


@dataclass
class AutoencoderConfig:
    widths: tuple = (32, 64, 128, 256, 256)  # encoder convolutions, each halving the resolution
    latent: int = 16  # bottleneck channels at 1/32 of the input size (8 x 8 at 256 px)
    epochs: int = 60  # measured on bottle: 30 clearly worse, 100 no better (README)
    lr: float = 1e-3
    batch_size: int = 8
    ssim_loss: float = 0.5  # loss = (1 - w) MSE + w (1 - SSIM), the report's 0.5 / 0.5
    ssim_map: float = 0.9  # map = (1 - w) squared error + w (1 - SSIM map), each standardized; SSIM-heavy measured best
    rotate: float = 0.0  # augmentation during training (degrees, flips, colour jitter)
    flip: bool = False
    jitter: float = 0.0
    image_score: str = "topk"  # max, or topk: the mean of the top_k map values
    top_k: int = 100
    blur_sigma: float = BLUR_SIGMA

    def __post_init__(self):
        self.widths = tuple(self.widths)
        check_ranges(self, widths=(1, 4096), latent=(1, 4096), epochs=(1, 100_000), lr=(0, 1), batch_size=(1, 4096),
                     rotate=(0, 180), jitter=(0, 1), blur_sigma=(0, 32))
        if len(self.widths) > 8:
            raise ValueError("widths: at most 8 encoder convolutions")
        if not self.widths or min(self.widths) < 1 or self.latent < 1:
            raise ValueError("widths and latent must be positive channel counts")
        check_image_score(self)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 <= self.ssim_loss <= 1 or not 0 <= self.ssim_map <= 1:
            raise ValueError("ssim_loss and ssim_map must be in [0, 1]")


class Autoencoder(FusedMapDetector):
    """Symmetric convolutional autoencoder (the report's SCAE, its sec. 4.4), trained from
    scratch on normal images with 0.5 MSE + 0.5 (1 - SSIM). It learns to squeeze normal
    images through a narrow bottleneck and back; a defect does not come back, so the map
    combines the reconstruction's squared error with its (1 - SSIM) map."""
    name = "autoencoder"
    Config = AutoencoderConfig

    def __init__(self, config, input_size=DEFAULT_IMAGE_SIZE, weights="imagenet"):
        super().__init__(config, input_size, components=2)  # squared error, 1 - SSIM
        if any(v % 2 ** len(config.widths) for v in self.input_size):
            raise ValueError(f"input size {input_size} must be a multiple of {2 ** len(config.widths)} "
                             f"for {len(config.widths)} halvings")

        def block(conv, c_out):
            return [conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        encoder, c = [], 3
        for w in config.widths:  # 4x4 stride-2 convolutions: each halves the resolution
            encoder += block(nn.Conv2d(c, w, 4, 2, 1), w)
            c = w
        encoder += [nn.Conv2d(c, config.latent, 1)]  # the bottleneck
        decoder = block(nn.Conv2d(config.latent, c, 1), c)
        for w in config.widths[-2::-1]:  # the mirror image
            decoder += block(nn.ConvTranspose2d(c, w, 4, 2, 1), w)
            c = w
        decoder += [nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Sigmoid()]
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.eval()

    def forward(self, images):
        return self.decoder(self.encoder(images))

    def loss(self, images, reconstructions):
        w = self.config.ssim_loss
        mse = (images - reconstructions).square().mean()
        return (1 - w) * mse + w * (1 - ssim_map(images, reconstructions).mean())

    def fit(self, batches, seed=0):
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        images = torch.cat([(b * 255).round().to(torch.uint8) for b in batches])
        N = len(images)

        def steps(epoch):
            order = torch.randperm(N, generator=g)
            for a in range(0, N, cfg.batch_size):
                x = images[order[a: a + cfg.batch_size]].to(self.device).float() / 255
                x = augment(x, g, cfg.rotate, cfg.flip, cfg.jitter).contiguous(memory_format=torch.channels_last)
                with train_autocast(self.device, self.precision):
                    y = self(x)
                yield self.loss(x, y.float()), len(x)  # SSIM in fp32

        self.train()
        self.to(memory_format=torch.channels_last)  # oneDNN trains convolutions faster in this layout
        train_loop(self.parameters(), cfg.epochs, lambda epoch: cfg.lr, steps, self.precision)
        self.eval()
        self.to(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def component_maps(self, images):
        """(B, 2, H, W): per-pixel squared error (channel mean) and 1 - SSIM, blurred."""
        y = self(images)
        maps = [(images - y).square().mean(1), 1 - ssim_map(images, y)]
        return self.blurred(maps)

    @torch.no_grad()
    def score(self, images):
        z = self.standardized(self.component_maps(images.to(self.device)))
        w = self.config.ssim_map
        maps = (1 - w) * z[:, 0] + w * z[:, 1]
        return self.image_scores(maps), maps

# -----------------------------------------------------------------------------
# The detector registry and its settings (-s KEY=VALUE)

DETECTORS = {cls.name: cls for cls in (PaDiM, PatchCore, EfficientAD, Autoencoder)}


def make_config(model, settings=None, **common):
    """The detector's Config from common options (backbone) and `-s KEY=VALUE` strings,
    each parsed to its field's type. Unknown keys and bad values are VadErrors."""
    if model not in DETECTORS:
        raise VadError(f"unknown model {model!r}: choose from {', '.join(DETECTORS)}")
    cls = DETECTORS[model].Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in common.items() if v is not None and k in fields}  # e.g. no backbone for the autoencoder
    for item in settings or ():
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix(f"{model}.")
        if not sep or key not in fields:
            raise VadError(f"-s {item}: {model} settings are {', '.join(f'{k}=' for k in fields)}")
        values[key] = _parse_value(key, text.strip(), fields[key].default)
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise VadError(f"{model} settings: {e}") from None


def _parse_value(key, text, default):
    """Parse a -s value to the type of the field's default (None defaults are optional ints)."""
    try:
        if default is None:
            return None if text.lower() in ("none", "") else int(text)
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split(",") if v)
        return type(default)(text)
    except ValueError:
        kind = "comma-separated integers" if isinstance(default, tuple) else type(default or 0).__name__
        raise VadError(f"-s {key}={text}: expected {kind}") from None

# -----------------------------------------------------------------------------
# Model files: one .pt = format header + config + every tensor, loadable with weights_only


def _digest(checkpoint):
    """SHA-256 over everything that decides how the model scores: detector, config, input
    size, framing, precision, normalization, and the names, dtypes, shapes and bytes of
    every tensor of its state dict. An integrity check against damage and accidental
    edits, not a signature: anyone who can edit the file can recompute it."""
    h = hashlib.sha256()
    header = {k: checkpoint[k] for k in ("detector", "config", "image_size", "framing", "precision", "normalization")}
    h.update(json.dumps(header, sort_keys=True).encode())
    state = checkpoint["state_dict"]
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _torch_save(obj, path):
    # Through a file object: torch.save names the archive's records after a path it is
    # given, which would make two saves of one model differ by their temporary names.
    with open(path, "wb") as f:
        torch.save(obj, f)


def save(detector, path, info=None):
    """Write the detector to one .pt file, atomically (temporary file, then rename), with
    `info` (default: what fit() recorded in detector.info) about how it was fitted."""
    state = {k: v.detach().cpu() for k, v in detector.state_dict().items()}
    odd = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if odd:  # load() would refuse the file: refuse to write it, and keep the old one
        raise VadError(f"not writing {path}: the model's {odd[0]} holds NaN or infinite values")
    checkpoint = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vad_version": __version__,
        "detector": detector.name,
        "config": dataclasses.asdict(detector.config),
        "image_size": list(detector.input_size),  # the detector's input size (the file's name for it)
        "framing": dataclasses.asdict(detector.framing),
        "precision": detector.precision,  # the backbone's at fit (the threshold was calibrated with it)
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "threshold": float(detector.threshold),
        "info": dict(detector.info if info is None else info),
        "state_dict": state,
    }
    checkpoint["sha256"] = _digest(checkpoint)
    try:
        atomic_write(path, lambda tmp: _torch_save(checkpoint, tmp))
    except (OSError, RuntimeError) as e:  # disk full, read-only folder, ...: the old file (if any) is intact
        if STOP_SIGNAL:  # SIGTERM's SystemExit, raised inside torch's writer, comes out as its RuntimeError
            raise SystemExit(128 + STOP_SIGNAL) from None
        # torch's zip writer reports a failed write as a RuntimeError, with its C++ context
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        raise VadError(f"could not write model file {path}: {reason}") from None


MODEL_KEYS = {"format", "format_version", "vad_version", "detector", "config", "image_size", "framing", "precision",
              "normalization", "threshold", "info", "sha256", "state_dict"}


def _typed(value, default):
    """Whether a config value read from a file has the type its field's default has."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int) or default is None:  # None: an optional int
        return (value is None and default is None) or (isinstance(value, int) and not isinstance(value, bool))
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


def check_info(info):
    """Raise ValueError unless a model file's info (a .pt's, or an .onnx's metadata) is
    flat and small, its numbers finite and in range: nested containers could share
    references without end, and every reader of it (update, info) trusts its values."""
    if not (isinstance(info, dict) and len(info) <= 64 and all(
            isinstance(k, str) and len(k) <= 256 and (v is None or type(v) is bool
                                                      or (type(v) is int and 0 <= v <= MAX_SEED)
                                                      or (type(v) is float and math.isfinite(v))
                                                      or (isinstance(v, str) and len(v) <= 4096))
            for k, v in info.items())):
        raise ValueError("its info is not a small flat dictionary of strings and numbers in range")


def check_header(checkpoint):
    """Raise ValueError unless every header field of a model file has its type and range."""
    if set(checkpoint) != MODEL_KEYS:
        unknown, missing = sorted(set(checkpoint) - MODEL_KEYS), sorted(MODEL_KEYS - set(checkpoint))
        raise ValueError(f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}")
    # Types first: an unpickled value is compared or hashed only once it is known to be a
    # string (a crafted deep tuple would recurse in C; check_archive bounds nesting too).
    if not isinstance(checkpoint["detector"], str) or checkpoint["detector"] not in DETECTORS:
        raise ValueError(f"unknown detector {str(checkpoint['detector'])[:100]!r}")
    config, Config = checkpoint["config"], DETECTORS[checkpoint["detector"]].Config
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    if not isinstance(config, dict) or not set(config) <= set(defaults):
        raise ValueError("its config has unknown settings")
    for key, value in config.items():
        if not _typed(value, defaults[key]):
            raise ValueError(f"config {key}={value!r} has the wrong type")
    size = checkpoint["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v >= 1 for v in size)
            and size[0] * size[1] <= MAX_PIXELS):
        raise ValueError(f"image_size {size!r} is not a valid input size")
    framing_from_record(checkpoint["framing"])
    if not isinstance(checkpoint["precision"], str) or checkpoint["precision"] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {str(checkpoint['precision'])[:100]!r} is not fp32, bf16 or fp16")
    norm = checkpoint["normalization"]
    if not (isinstance(norm, dict) and all(isinstance(v, list) and all(type(x) is float for x in v)
                                           for v in norm.values())) \
            or norm != {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}:
        raise ValueError("its input normalization is not the ImageNet one vad applies")
    check_info(checkpoint["info"])
    if type(checkpoint["threshold"]) is not float or not math.isfinite(checkpoint["threshold"]):
        raise ValueError("its threshold is not a finite number")
    if not isinstance(checkpoint["state_dict"], dict) or not isinstance(checkpoint["sha256"], str):
        raise ValueError("its tensors or checksum are missing")


def check_model_path(path):
    """The model file's Path, or a VadError if it is missing or not a regular file."""
    path = Path(path)
    if not path.exists():
        raise VadError(f"model file {path} does not exist")
    if not path.is_file():
        raise VadError(f"{path} is not a vad model file (not a regular file)")
    return path


def load(path, device="cpu", precision="model"):
    """Read a .pt written by save(). A model file is input like any other, and may be
    crafted: its size and nesting are bounded before reading (check_archive), only tensors and plain
    containers are unpickled (weights_only=True, so no code runs), every header field is
    checked for type and range, the checksum over what decides scoring must match, and
    every tensor must have the dtype and shape the config implies before the detector
    is built. Any failure is one VadError. precision "model" keeps the backbone precision
    the model was fitted (and its threshold calibrated) with; any other value overrides
    it (see pick_precision)."""
    path = check_model_path(path)
    checkpoint = load_tensors(path, f"model file {path} does not exist",
                              f"{path} is not a vad model file ({{reason}}); fit one with 'vad.py fit'")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("format"), str) \
            or checkpoint["format"] != FORMAT_NAME:
        raise VadError(f"{path} is not a vad model file; fit one with 'vad.py fit'")
    version = checkpoint.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        shown = version if type(version) is int else type(version).__name__
        raise VadError(f"{path} has model format version {shown}, this vad {__version__} reads version "
                       f"{FORMAT_VERSION}; fit the model again with this vad")
    try:
        check_header(checkpoint)
        cls, state = DETECTORS[checkpoint["detector"]], checkpoint["state_dict"]
        config, framing = cls.Config(**checkpoint["config"]), framing_from_record(checkpoint["framing"])
        if list(framing.input_size) != checkpoint["image_size"]:
            raise ValueError("its input size does not match its framing")
        with torch.device("meta"):  # shapes and dtypes only: a crafted config allocates nothing
            cls(config, checkpoint["image_size"], weights="empty").check_state(state)
        if _digest(checkpoint) != checkpoint["sha256"]:  # after the checks: hashing copies every tensor
            raise VadError(f"{path} is corrupted or was modified since it was saved (checksum mismatch); fit it again")
        detector = cls(config, checkpoint["image_size"], weights="empty")
        detector.framing = framing
        for name, tensor in state.items():  # fitted buffers have data-dependent shapes
            module, _, leaf = name.rpartition(".")
            owner = detector.get_submodule(module)
            if leaf in owner._buffers and owner._buffers[leaf].shape != tensor.shape:
                owner._buffers[leaf] = torch.empty_like(tensor)
        detector.load_state_dict(state)
    except VadError as e:
        raise VadError(str(e) if str(path) in str(e) else f"{path} is not a valid vad model ({e}); fit it again") \
            from None
    except Exception as e:
        raise VadError(f"{path} is not a valid vad model ({type(e).__name__}: {e}); fit it again") from None
    detector.info, detector.sha256 = checkpoint["info"], checkpoint["sha256"]
    detector.vad_version = str(checkpoint["vad_version"])[:100]  # that wrote it (vad.py info)
    detector = detector.to(pick_device(device)).eval()
    return detector.set_precision(checkpoint["precision"] if precision == "model" else
                                  pick_precision(precision, detector.device))


def is_vad_model(path):
    """Whether `path` is a file save() wrote, judged from its header without unpickling
    anything: a torch zip archive whose small pickle record names the vad format."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
            return (len(records) == 1 and records[0].file_size <= 2**20
                    and FORMAT_NAME.encode() in archive.read(records[0]))
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return False

# -----------------------------------------------------------------------------
# Image I/O: placing images in the frame, tiles, reading images, masks and data sets


def is_image(path):
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder):
    """Every image file under `folder`, recursively, in sorted order; other files and
    broken links are skipped with one warning that counts them (none if there is no
    image at all: the caller's error then says so)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file() or (p.is_symlink() and not p.exists())]
    images = sorted(p for p in files if is_image(p) and p.is_file())
    if images and len(images) < len(files):
        broken = sum(not p.exists() for p in files)
        warn(f"skipped {len(files) - len(images)} non-image file(s) in {folder}"
             + (f", {broken} of them broken link(s)" if broken else ""))
    return images


def _open(source):
    """Decode an image (a path, or a file's bytes), refusing absurd sizes before any pixel
    is decoded."""
    path = "(uploaded bytes)" if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        w, h = image.size
        if w * h > MAX_PIXELS:
            raise VadError(f"cannot read image {path}: {w}x{h} pixels is over vad's limit of "
                           f"{MAX_PIXELS:,} (a decompression bomb, or tile it first)")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise VadError(f"cannot read image {path}: {e}") from None
    return ImageOps.exif_transpose(image)  # phones and some cameras store rotation in EXIF


def placement(source_size, frame, resize):
    """Where an image of size (H0, W0) lands in a frame (H, W): it is resized to (h, w)
    and its top-left corner put at (top, left), negative where crop cuts it."""
    (H0, W0), (H, W) = source_size, frame
    if resize == "fit":
        return H, W, 0, 0
    s = (min if resize == "pad" else max)(H / H0, W / W0)
    h, w = max(1, round(H0 * s)), max(1, round(W0 * s))
    return h, w, (H - h) // 2, (W - w) // 2


def valid_box(source_size, frame, resize):
    """(top, left, bottom, right) of the frame covered by the image (pad leaves borders)."""
    h, w, top, left = placement(source_size, frame, resize)
    return max(top, 0), max(left, 0), min(top + h, frame[0]), min(left + w, frame[1])


def blend_window(tile):
    """1-D stitching weight: highest at the tile's centre, falling linearly to a small
    value at its edges, so overlaps fade from one tile to the next (and a pixel covered
    by one tile only keeps that tile's value)."""
    i = torch.arange(tile, dtype=torch.float32)
    return torch.minimum(i + 1, tile - i).clamp_max(tile / 4) / (tile / 4)


class Stitcher:
    """Puts one image's map back together from the maps of its tiles (untiled: its one
    map), each tile's weighted by blend_window in both directions."""

    def __init__(self, frame_size, tile, count):
        self.frame_size, self.tile, self.left = tuple(frame_size), tile, count
        if tile:
            H, W = self.frame_size
            canvas = (max(H, tile), max(W, tile))  # a side shorter than a tile was padded
            self.window = blend_window(tile)[:, None] * blend_window(tile)[None]
            self.sum, self.weight = torch.zeros(canvas), torch.zeros(canvas)

    def add(self, anomaly_map, offset):
        """A tile's map (T, T) at offset (top, left) of the frame."""
        if self.tile:
            (y, x), T = offset, self.tile
            self.sum[y: y + T, x: x + T] += anomaly_map * self.window
            self.weight[y: y + T, x: x + T] += self.window
        else:
            self.sum = anomaly_map
        self.left -= 1

    @property
    def complete(self):
        return self.left == 0

    def result(self):
        """The map over the frame (H, W)."""
        if not self.tile:
            return self.sum
        H, W = self.frame_size
        return self.sum[:H, :W] / self.weight[:H, :W]


# Image reading runs in a background thread (prefetch), so it uses Pillow and numpy
# only: a torch op there would start a second OpenMP team next to the compute's, and
# teams that spin-wait on shared cores can stall each other.


def _to_array(image):
    """A decoded Pillow image (RGB, or F in 0..1) -> float32 array (3, H, W) in [0, 1]."""
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 1)  # bilinear resizing can overshoot by rounding
        return np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape)))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)).astype(np.float32) / 255


def _mean_canvas(height, width):
    return np.ascontiguousarray(np.broadcast_to(np.float32(IMAGENET_MEAN)[:, None, None], (3, height, width)))


def _decoded(source):
    """Open and normalize the mode: RGB, or F in 0..1 for deep grey images (16-bit
    scaled from 0..65535, float taken as 0..1)."""
    image = _open(source)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        scale = 1.0 if image.mode == "F" else 65535.0
        pixels = np.asarray(image, dtype=np.float32) / scale
        if not np.isfinite(pixels).all():  # no intensity to score, and NaN would pass every comparison
            path = "(uploaded bytes)" if isinstance(source, (bytes, bytearray)) else source
            raise VadError(f"cannot read image {path}: it holds NaN or infinite pixels (a float image must hold "
                           f"finite values, 0..1)")
        return Image.fromarray(np.clip(pixels, 0, 1), mode="F")
    if image.mode == "P" or image.mode == "LA":
        image = image.convert("RGBA")
    return image.convert("RGB")


def _paste(canvas, x, top, left):
    """Put x (..., h, w) into canvas (..., H, W) with its corner at (top, left), keeping
    what falls inside (crop places it partly outside). Returns canvas."""
    H, W = canvas.shape[-2:]
    h, w = x.shape[-2:]
    rows, cols = slice(max(top, 0), min(top + h, H)), slice(max(left, 0), min(left + w, W))
    canvas[..., rows, cols] = x[..., rows.start - top: rows.stop - top, cols.start - left: cols.stop - left]
    return canvas


def _resized_for_frame(image, frame, resize, resample):
    """A Pillow image resized for the frame as placement() says -> (the part of it that
    lands in the frame, its (top, left) there). crop resizes only that part (Pillow's box
    resampling samples exactly as resizing the whole and cutting would), so no
    intermediate is ever larger than the frame, however extreme the aspect ratio."""
    (H0, W0), (H, W) = (image.height, image.width), frame
    h, w, top, left = placement((H0, W0), frame, resize)
    r0, r1, c0, c1 = max(0, -top), min(h, H - top), max(0, -left), min(w, W - left)
    if (r0, r1, c0, c1) != (0, h, 0, w):
        box = (c0 * W0 / w, r0 * H0 / h, c1 * W0 / w, r1 * H0 / h)
        return image.resize((c1 - c0, r1 - r0), resample, box=box), top + r0, left + c0
    return (image if (h, w) == (H0, W0) else image.resize((w, h), resample)), top, left


def frame_image(source, framing):
    """Image file or bytes -> (frame (3, H, W) float32 array in [0, 1], the image's own
    size (H0, W0)).

    Grey, palette, RGBA, CMYK and 16-bit images all become RGB. 16-bit grey images
    ("I;16", or "I" as Pillow opens some 16-bit PNGs) are scaled from 0..65535, the same
    for every image, not clipped at 255; float images ("F") are taken as 0..1. pad fills
    its borders with the ImageNet mean colour, which the backbone's normalization turns
    into zeros: the same as the zero padding its convolutions already see at the edges.
    """
    framing = as_framing(framing)
    image = _decoded(source)
    source_size = (image.height, image.width)
    frame = framing.size or source_size
    image, top, left = _resized_for_frame(image, frame, framing.resize, Image.BILINEAR)
    x = _to_array(image)
    if (image.height, image.width, top, left) != (*frame, 0, 0):
        x = _paste(_mean_canvas(*frame), x, top, left)
    return x, source_size


def read_image(path, size):
    """Image file (or its bytes) -> float tensor (3, H, W) in [0, 1], stretched to `size`
    (N or (H, W)); see frame_image for modes and aspect-keeping framings."""
    return torch.from_numpy(frame_image(path, as_framing(size))[0])


def read_mask(path, framing):
    """Mask file -> bool tensor (H, W) placed in the frame as its image is; any nonzero
    pixel is defect."""
    framing = as_framing(framing)
    mask = np.asarray(_open(path)) != 0
    if mask.ndim == 3:
        mask = mask.any(2)
    frame = framing.size or mask.shape
    mask, top, left = _resized_for_frame(Image.fromarray(mask.astype(np.uint8) * 255), frame, framing.resize,
                                         Image.NEAREST)
    return torch.from_numpy(_paste(np.zeros(frame, dtype=bool), np.asarray(mask) > 0, top, left))


def fit_within(size, max_side):
    """(H, W) scaled down, aspect kept, so that no side is over max_side; as it is if it fits."""
    H, W = size
    if max(H, W) <= max_side:
        return (H, W)
    s = max_side / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def map_to_source(anomaly_map, source_size, framing, size=None):
    """An anomaly map over the frame (H, W) -> the same map at the image's own size
    source_size = (H0, W0), undoing the framing: NaN where crop cut the image away.
    size: the map at that size instead (the image scaled down, as for an overlay),
    computed there directly rather than shrunk from a full-size map."""
    framing = as_framing(framing)
    source_size = tuple(source_size)
    (H1, W1) = size = tuple(size) if size else source_size
    frame = framing.size or source_size
    if source_size == tuple(frame) == size:  # every resize mode is the identity then
        return np.asarray(anomaly_map, dtype=np.float32)
    m = torch.as_tensor(anomaly_map, dtype=torch.float32)
    h, w, top, left = placement(source_size, frame, framing.resize)
    t, l, b, r = valid_box(source_size, frame, framing.resize)
    # The covered part of the frame corresponds to this part of the resized image ...
    part = m[t:b, l:r]
    # ... which, scaled by (H1 / h, W1 / w), is this part of the image at the output size.
    y0, y1 = round((t - top) * H1 / h), round((b - top) * H1 / h)
    x0, x1 = round((l - left) * W1 / w), round((r - left) * W1 / w)
    # an extreme crop can shrink the inspected part below one output pixel: keep one
    y0, x0 = min(y0, H1 - 1), min(x0, W1 - 1)
    y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
    out = torch.full(size, float("nan"))
    out[y0:y1, x0:x1] = F.interpolate(part[None, None], size=(y1 - y0, x1 - x0), mode="bilinear",
                                      align_corners=False)[0, 0]
    return out.numpy()


def read_source(source, max_side=None):
    """Image file or bytes -> (3, H0, W0) in [0, 1] at its own size (for heat maps), or
    scaled down to fit_within max_side: by Pillow, on the decoded bytes, before it
    becomes floats four times their size."""
    image = _decoded(source)
    if max_side:
        h, w = fit_within((image.height, image.width), max_side)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.BILINEAR, reducing_gap=3.0)  # a box pre-reduction, then bilinear
    return torch.from_numpy(_to_array(image))


@dataclass
class Dataset:
    """A category: normal training images, and (in a known layout) labelled test images."""
    root: Path
    train: list
    test: list = field(default_factory=list)  # image paths
    labels: list = field(default_factory=list)  # 0 good, 1 defective
    masks: list = field(default_factory=list)  # mask path, or None where unknown
    layout: str = "folder of good images"

    @property
    def name(self):
        return self.root.name


# Data set layouts: (name, the folder of good training images, [(test folder, label)],
# where the mask of a defective test image lies). A folder in none of them is read as
# good images only, unless it looks labelled (LABELLED), which is refused: training on
# a data set's defects, without a word, is the one mistake that cannot be seen later.
LAYOUTS = [
    ("MVTec AD 2", "train/good", lambda root: [(root / "test_public" / "good", 0), (root / "test_public" / "bad", 1)],
     lambda root, folder, path: root / "test_public" / "ground_truth" / folder.name / f"{path.stem}_mask.png"),
    ("MVTec AD", "train/good", lambda root: [(f, int(f.name != "good")) for f in sorted((root / "test").glob("*"))
                                            if f.is_dir()],
     lambda root, folder, path: root / "ground_truth" / folder.name / f"{path.stem}_mask.png"),
    ("BTech", "train/ok", lambda root: [(root / "test" / "ok", 0), (root / "test" / "ko", 1)],
     lambda root, folder, path: root / "ground_truth" / folder.name / f"{path.stem}.png"),
]
LABELLED = ("test", "test_public", "ground_truth", "validation", "ko", "ng", "bad", "defect*", "anomal*")
NORMAL_NAMES = ("good", "ok", "normal", "pass")  # a labelled split's normal class, in any case (issue 21)
VISA_SPLIT = "split_csv/1cls.csv"  # VisA's 1-class split, beside its categories: object,split,label,image,mask
MAX_SPLIT_BYTES = 64 * 2**20


def read_visa(root):
    """A VisA category folder (VisA/candle) as its 1-class split lists it: the CSV's
    train rows (all normal) for fitting, its test rows labelled normal/anomaly, with
    masks. Paths in the CSV are relative to the VisA folder and must stay inside it."""
    base, split = root.parent, root.parent / VISA_SPLIT
    if split.stat().st_size > MAX_SPLIT_BYTES:
        raise VadError(f"--data {root}: {split} is over {MAX_SPLIT_BYTES // 2**20} MB; it is not VisA's split file")
    dataset = Dataset(root, [], layout="VisA (1cls split)")
    inside = base.resolve()

    def path(text, line):
        if not isinstance(text, str) or not text or "\0" in text:  # a short row, or a name no file can have
            raise VadError(f"--data {root}: {split} line {line} names no usable path ({text!r})")
        p = base / text
        if not p.resolve().is_relative_to(inside):
            raise VadError(f"--data {root}: {split} line {line} names {text!r}, outside {base}")
        return p
    try:
        with open(split, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VadError(f"--data {root}: cannot read {split} ({e})") from None
    if not rows or not {"object", "split", "label", "image", "mask"} <= set(rows[0]):
        raise VadError(f"--data {root}: {split} lacks VisA's columns object,split,label,image,mask")
    for line, row in enumerate(rows, 2):
        if row["object"] != root.name:
            continue
        if row["label"] not in ("normal", "anomaly") or row["split"] not in ("train", "test"):
            raise VadError(f"--data {root}: {split} line {line}: split {row['split']!r} label {row['label']!r} "
                           f"is not train/test and normal/anomaly")
        if row["split"] == "train":
            if row["label"] != "normal":  # the 1-class split trains on normal images only
                raise VadError(f"--data {root}: {split} line {line} puts an anomaly in the training split")
            dataset.train.append(path(row["image"], line))
        else:
            dataset.test.append(path(row["image"], line))
            dataset.labels.append(int(row["label"] == "anomaly"))
            dataset.masks.append(path(row["mask"], line) if row["label"] == "anomaly" and row["mask"] else None)
    if not dataset.train:
        raise VadError(f"--data {root}: {split} lists no training images for {root.name!r}; "
                       f"point --data at one category folder of VisA (e.g. VisA/candle)")
    return dataset


def check_unlabelled(folder, root):
    """Refuse a folder read recursively as good images if, at any depth, a folder in it
    holds a normal-named subfolder (NORMAL_NAMES) beside other folders of images: that is
    a labelled split (MVTec's test/, ok/ beside ng/), whose other classes are defects."""
    holds_images, children = set(), collections.defaultdict(list)
    for top, dirs, files in os.walk(folder, topdown=False, followlinks=True):
        top = Path(top)
        if any(is_image(f) for f in files) or any(top / d in holds_images for d in dirs):
            holds_images.add(top)
        children[top] = sorted(top / d for d in dirs)
    for parent in sorted(children):
        normal = [d for d in children[parent] if d.name.lower() in NORMAL_NAMES]
        others = [d for d in children[parent] if d in holds_images and d not in normal]
        if normal and others:
            raise VadError(f"--data {root}: {parent} is a labelled split ({normal[0].name}/ beside "
                           f"{', '.join(d.name + '/' for d in others[:3])}{' ...' if len(others) > 3 else ''}), "
                           f"whose other folders hold defects; point --data at {normal[0]} to fit on its good "
                           f"images only")


def read_dataset(root):
    """A category folder in a known layout (LAYOUTS: MVTec AD, MVTec AD 2, BTech; or VisA,
    by the split file beside it) with its labelled test images and masks, or a plain
    folder of images, all of which are then training images. A plain folder with a
    subfolder named like a label (LABELLED) is refused."""
    root = Path(root)
    if not root.is_dir():
        raise VadError(f"--data {root}: no such folder; give an MVTec AD category folder or a folder of images")
    if (root.parent / VISA_SPLIT).is_file() and (root / "Data" / "Images").is_dir():
        return read_visa(root)
    if (root / VISA_SPLIT).is_file():
        raise VadError(f"--data {root}: this is VisA's top folder; point --data at one category (e.g. {root}/candle)")
    for layout, train, tests, mask_of in LAYOUTS:
        if (root / train).is_dir() and (layout != "MVTec AD 2" or (root / "test_public").is_dir()):
            break
    else:
        check_unlabelled(root, root)
        labelled = sorted(p for p in root.rglob("*") if p.is_dir() and any(fnmatch.fnmatch(p.name.lower(), pattern)
                                                                          for pattern in LABELLED))
        if labelled:
            raise VadError(f"--data {root}: it holds {labelled[0].relative_to(root)}/, which looks like labelled "
                           f"test data, but not in a layout vad knows (MVTec AD, MVTec AD 2, BTech, VisA); point --data at "
                           f"the folder of good images only")
        images = list_images(root)
        if not images:
            raise VadError(f"--data {root}: no images found (expected {', '.join(IMAGE_EXTENSIONS)} files, "
                           f"or train/good/)")
        return Dataset(root, images)
    check_unlabelled(root / train, root)
    dataset = Dataset(root, list_images(root / train), layout=layout)
    if not dataset.train:
        raise VadError(f"--data {root}: {train}/ holds no images")
    for folder, label in tests(root):
        for path in list_images(folder) if folder.is_dir() else []:
            mask = mask_of(root, folder, path) if label else None
            dataset.test.append(path)
            dataset.labels.append(label)
            dataset.masks.append(mask if mask is not None and mask.exists() else None)
    return dataset


def _header_size(path):
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, UnidentifiedImageError):
        return None  # reading it later reports why


def check_masks(dataset):
    """One warning for each way the defective test images and their masks disagree:
    images without a mask (left out of the pixel metrics; with none at all, the pixel
    metrics are NaN) and masks of another size than their image (stretched onto it)."""
    defective = [i for i, label in enumerate(dataset.labels) if label]
    missing = sum(dataset.masks[i] is None for i in defective)
    where = f"ground_truth/<defect>/<name>_mask.png in {dataset.root}"
    if defective and missing == len(defective):
        warn(f"none of the {missing} defective test images has a mask ({where}): no pixel metrics")
    elif missing:
        warn(f"{missing} of {len(defective)} defective test images have no mask ({where}): "
             f"they are left out of the pixel metrics")
    resized = sum(_header_size(dataset.masks[i]) not in (None, _header_size(dataset.test[i]))
                  for i in defective if dataset.masks[i] is not None)
    if resized:
        warn(f"{resized} mask(s) in {dataset.root} differ in size from their images: each is stretched onto "
             f"its image for the pixel metrics")


def cut_tiles(frame, framing):
    """frame array (3, H, W) -> (tiles (n, 3, T, T), their (top, left) offsets); untiled:
    the frame itself. A side shorter than a tile is padded with the mean colour (not
    scored)."""
    if not framing.tile:
        return frame[None], [(0, 0)]
    T, (H, W) = framing.tile, frame.shape[1:]
    framing.check_tiles((H, W), f"a {H}x{W} image")
    if H < T or W < T:
        frame = _paste(_mean_canvas(max(H, T), max(W, T)), frame, 0, 0)
    offsets = [(y, x) for y in tile_starts(H, T, framing.overlap) for x in tile_starts(W, T, framing.overlap)]
    return np.stack([frame[:, y: y + T, x: x + T] for y, x in offsets]), offsets


def tiles_per_image(framing):
    """Tiles cut from each image, or None when it depends on each image's size."""
    if not framing.tile:
        return 1
    if framing.size is None:
        return None
    H, W = framing.size
    return len(tile_starts(H, framing.tile, framing.overlap)) * len(tile_starts(W, framing.tile, framing.overlap))


class Frame(typing.NamedTuple):
    """One image read for a model: its frame, the model inputs cut from it, or why not."""
    index: int  # its position among the sources
    frame: np.ndarray = None  # (3, H, W) in [0, 1]
    source_size: tuple = None  # the image's own (H0, W0)
    tiles: np.ndarray = None  # (n, 3, T, T) model inputs; untiled, the frame itself (1, 3, H, W)
    offsets: list = None  # (top, left) of each tile in the frame
    error: str = None


def read_frames(sources, framing):
    """Yield a Frame per source (image path or bytes), in order, read ahead in a
    background thread; an unreadable file yields its error instead."""
    def frames():
        for i, source in enumerate(sources):
            try:
                x, source_size = frame_image(source, framing)
                tiles, offsets = cut_tiles(x, framing)
            except VadError as e:
                yield Frame(i, error=str(e))
                continue
            yield Frame(i, x, source_size, tiles, offsets)
    if len(sources) == 1:
        return frames()  # nothing to overlap with (one upload to serve)
    n = tiles_per_image(framing)
    ahead = max(2, math.ceil(BATCH_SIZE / n)) if n and framing.size else 2  # ~a batch, never many huge images
    return prefetch(frames(), ahead)


def load_images(paths, framing, batch_size=BATCH_SIZE, desc="images"):
    """Yield batches of model inputs (B, 3, h, w), tiles if the framing tiles, for
    fitting: the first unreadable file is an error. The progress bar counts inputs."""
    framing = as_framing(framing)
    n = tiles_per_image(framing)

    def tiles():
        for f in read_frames(paths, framing):
            if f.error:
                raise VadError(f.error)
            yield from f.tiles

    batch = []
    for tile in progress(tiles(), n and n * len(paths), desc):
        batch.append(torch.from_numpy(tile))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)

# -----------------------------------------------------------------------------
# API: fit, score, evaluate; metrics (image AUROC, pixel AUROC, AUPRO, thresholded and oracle F1); drift


def threshold_from(scores):
    """The decision threshold from scores of held-out normal images: their maximum plus
    10% of their spread (max - median). Normal test images then rarely exceed it, and
    with only a few held-out images it is still above every one of them."""
    s = np.asarray(scores, dtype=np.float64)
    return float(s.max() + 0.1 * (s.max() - np.median(s)))


CONFIDENCE = 0.95  # of the upper bound stated with every false-reject rate (issue 21)
MIN_FRR = 1e-6  # the smallest target rate calibrate takes: stating it already takes 3 million good images
HELD_OUT_RULE = "held-out: max + 10% of (max - median)"  # threshold_from, as info and `info` name it


def frr_upper_bound(k, n, confidence=CONFIDENCE):
    """The exact (Clopper-Pearson) one-sided upper confidence bound on a rate of which k
    of n trials were seen: the p at which Binomial(n, p) gives k or fewer with
    probability 1 - confidence, which is the `confidence` quantile of Beta(k+1, n-k).
    0 of 20 gives 13.9%. Bisection on the binomial tail, summed in log space: no scipy
    on this path (the test checks it against scipy.stats.beta.ppf)."""
    if k >= n:
        return 1.0
    if k == 0:  # the tail is (1 - p)^n
        return float(-math.expm1(math.log1p(-confidence) / n))
    i = np.arange(k + 1)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(k + 1)])
    lo, hi = 0.0, 1.0
    for _ in range(100):  # 2^-100: below fp64's resolution
        p = (lo + hi) / 2
        terms = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
        top = terms.max()
        if top + math.log(np.exp(terms - top).sum()) > math.log1p(-confidence):
            lo = p
        else:
            hi = p
    return hi


def images_needed(frr, confidence=CONFIDENCE):
    """How many good images, none of them rejected, bound the false-reject rate at `frr`
    with `confidence`: the smallest n with (1 - frr)^n <= 1 - confidence (299 for 1%)."""
    return math.ceil(math.log1p(-confidence) / math.log1p(-frr) - 1e-9)


def tail_threshold(good, frr):
    """The threshold that a fraction `frr` of good images is expected to exceed, from an
    exponential tail fitted to the good scores above their median: peaks over a
    threshold with a generalized Pareto of shape 0, the tail of every distribution in
    the Gumbel domain (maxima and sums of light-tailed variables, which an image score
    is). P(S > t) = (m / n) exp(-(t - u) / b), u the median, m of n scores above it, b
    their mean excess (the maximum-likelihood scale). README: its fit on bottle and
    KolektorSDD."""
    s = np.sort(np.asarray(good, dtype=np.float64))
    u = float(np.median(s))
    excess = s[s > u] - u
    if not len(excess) or frr >= len(excess) / len(s):
        return float(s[-1])
    return float(u + excess.mean() * math.log(len(excess) / len(s) / frr))


def frr_record(good, threshold, rule):
    """What a threshold implies on the good images it was set from, as info fields: the
    rule, how many of them it rejects and the 95% upper bound on the rate (issue 21)."""
    good = np.asarray(good, dtype=np.float64)
    k, n = int((good > threshold).sum()), len(good)
    return {"threshold_rule": rule[:1000], "frr_rejected": k, "frr_images": n,
            "frr_bound": round(frr_upper_bound(k, n), 6)}


def frr_text(info):
    """One line on the false-reject rate that a model's info records."""
    if type(info.get("frr_images")) is not int or not info["frr_images"]:
        return "false-reject rate: not recorded (fitted by an older vad)"
    k, n, bound = info["frr_rejected"], info["frr_images"], info["frr_bound"]
    return (f"false-reject rate: {k} of {n} good images above the threshold ({k / n:.1%}); "
            f"at most {bound:.1%} with {CONFIDENCE:.0%} confidence (Clopper-Pearson)")


HISTORY_CHARS = 4000  # info strings are at most 4096 (check_header): the oldest entries go first


def with_history(info, **entry):
    """info with `entry` appended to its history: fit, calibrate and update, in order,
    a JSON list in one string (info is flat, so a file needs no new format). The
    oldest entries go when it grows too long, counted in history_dropped."""
    history, dropped = read_history(info) + [entry], info.get("history_dropped", 0)
    while len(json.dumps(history)) > HISTORY_CHARS and len(history) > 1:
        del history[0]
        dropped = (dropped if type(dropped) is int else 0) + 1
    return {**info, "history": json.dumps(history)} | ({"history_dropped": dropped} if dropped else {})


def read_history(info):
    """The history list of a model's info ([] if absent or not a list of dicts)."""
    try:
        history = json.loads(info.get("history", "[]"), parse_constant=_not_finite)
    except (TypeError, ValueError, RecursionError):  # a crafted file's history: shown as none
        return []
    return history if isinstance(history, list) and all(isinstance(e, dict) for e in history) else []


def _not_finite(name):
    raise ValueError(f"{name} is not a finite number")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def weights_record(weights, backbone):
    """The backbone weights' file name and sha256, where there is a file (info)."""
    if weights == "imagenet" and backbone in IMAGENET_URLS:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_URLS[backbone]).name
    elif weights not in ("imagenet", "none", "empty"):
        path = Path(weights)
    else:
        return {}
    return {"weights_file": path.name, "weights_sha256": file_sha256(path) if path.is_file() else None}


def data_fingerprint(paths, root):
    """SHA-256 over the training images' paths (relative to the data folder) and sizes:
    the same list of files gives the same value wherever the folder is."""
    h = hashlib.sha256()
    for p in sorted(paths):
        p = Path(p)
        name = p.relative_to(root) if root is not None and p.is_relative_to(root) else p
        h.update(f"{name.as_posix()}|{p.stat().st_size if p.is_file() else -1}\n".encode())
    return h.hexdigest()


def split_holdout(n, fraction, seed):
    """Indices (fit, held_out) of n images: a seeded `fraction` kept out of fitting to
    calibrate the threshold (at least one when fraction > 0 and n >= 2)."""
    k = round(fraction * n)
    if fraction > 0 and k == 0 and n >= 2:
        k = 1
    k = min(k, n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[k:]), sorted(order[:k])


@dataclass
class Scored:
    """The result for one image: score, verdict and map, or why it could not be read."""
    path: typing.Any  # the file (or a label for uploaded bytes)
    score: float = float("nan")
    threshold: float = float("nan")
    anomaly_map: np.ndarray = None  # (H, W) float32 over the working frame; NaN where not inspected
    source_size: tuple = None  # the image's own (H0, W0); map_to_source() brings the map there
    error: str = None

    @property
    def verdict(self):
        return "ok" if self.score <= self.threshold else "anomalous"  # a NaN score is never "ok"


def score_files(detector, sources, batch_size=BATCH_SIZE, desc="score"):
    """Score image files (or their bytes); yield one Scored per source, in order.

    Each image is framed as the model was fitted (detector.framing); a tiled image's
    tiles are scored at the model's input size, batch_size inputs at a time, and their
    maps stitched back (Stitcher). The image score is then the detector's map_score() of
    the inspected pixels (for PatchCore, the maximum, without eq. 7's reweighting, which
    is defined for one input). An unreadable file yields its error and never stops the
    others. desc=None draws no progress bar."""
    framing = detector.framing
    H, W = detector.input_size
    batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // (H * W)))  # memory, whatever the input size
    open_maps, ready, batch = {}, {}, []  # index -> (its own size, Stitcher) while scored; index -> Scored

    def inputs():  # (index, model input, offset) for every tile of every readable image
        for f in read_frames(sources, framing):
            if f.error:
                ready[f.index] = Scored(_label(sources[f.index]), error=f.error)
                continue
            open_maps[f.index] = f.source_size, Stitcher(f.frame.shape[1:], framing.tile, len(f.offsets))
            for tile, offset in zip(f.tiles, f.offsets):
                yield f.index, torch.from_numpy(tile), offset

    def run():
        with torch.no_grad():
            scores, maps = detector.score(torch.stack([tile for _, tile, _ in batch]).to(detector.device))
        for (i, _, offset), single_score, m in zip(batch, scores.tolist(), maps.float().cpu()):
            source_size, stitcher = open_maps[i]
            stitcher.add(m, offset)
            if stitcher.complete:
                del open_maps[i]
                ready[i] = _scored(detector, sources[i], source_size, stitcher, single_score)
        batch.clear()

    def progressed():  # yields after each input, and once more after the last batch
        n = tiles_per_image(framing)
        for item in inputs() if desc is None else progress(inputs(), n and n * len(sources), desc):
            batch.append(item)
            if len(batch) == batch_size:
                run()
            yield
        if batch:
            run()
        yield

    done = 0
    for _ in progressed():
        while done in ready:
            yield ready.pop(done)
            done += 1


def _scored(detector, source, source_size, stitcher, single_score):
    """The Scored of an image whose map is complete: where the image does not cover the
    frame (pad, crop) or it was tiled, the score is taken over the inspected pixels only
    and the rest of the map is NaN."""
    anomaly_map, (H, W) = stitcher.result(), stitcher.frame_size
    t, l, b, r = valid_box(source_size, (H, W), detector.framing.resize)
    score = single_score
    if detector.framing.tile or (t, l, b, r) != (0, 0, H, W):
        inside = anomaly_map[t:b, l:r]
        score = detector.map_score(inside.reshape(-1))
        anomaly_map = torch.full((H, W), float("nan"))
        anomaly_map[t:b, l:r] = inside
    if not (math.isfinite(score) and torch.isfinite(anomaly_map[t:b, l:r]).all()):
        # e.g. fp16 overflow: no verdict, and no NaN or Infinity in a JSON line
        return Scored(_label(source), error=f"{_label(source)}: the model gave NaN or infinite values for it; "
                                            f"score it in fp32 (--precision fp32)")
    return Scored(_label(source), score, float(detector.threshold), anomaly_map.numpy(), source_size)


def every_image(results):
    """The list of Scored results, or the first unreadable image's error as a VadError:
    fitting and evaluating need every image."""
    results = list(results)
    for r in results:
        if r.error:
            raise VadError(r.error)
    return results


def _label(source):
    return "(uploaded bytes)" if isinstance(source, (bytes, bytearray)) else source


@dataclass(frozen=True)
class RunOptions:
    """How a detector is fitted: every default written once, here. The CLI builds one
    from its options (fit, bench); the API takes one, or keyword overrides of it."""
    backbone: str = "wide_resnet50_2"  # the feature extractor (PaDiM, PatchCore) or teacher (EfficientAD)
    weights: typing.Any = "imagenet"  # imagenet, none (random init) or a state-dict path
    image_size: typing.Any = DEFAULT_IMAGE_SIZE  # the working frame: N, "HxW", (H, W) or "native"
    resize: str = "fit"  # fit, pad or crop (Framing)
    tile: typing.Optional[int] = None  # tile side in px; None: the frame is the input
    tile_overlap: float = TILE_OVERLAP
    precision: str = "fp32"  # of the backbone and of training (pick_precision)
    device: str = "auto"
    seed: int = 0
    holdout: float = HOLDOUT
    batch_size: int = BATCH_SIZE
    epochs: typing.Optional[int] = None  # of the detectors that train; None: their config's own
    max_train: typing.Optional[int] = None  # fit on a seeded subset of this many training images
    settings: tuple = ()  # detector settings, "KEY=VALUE" strings (make_config)

    def __post_init__(self):
        object.__setattr__(self, "settings", tuple(self.settings or ()))
        if type(self.seed) is not int or not 0 <= self.seed <= MAX_SEED:
            raise VadError(f"seed {self.seed!r}: give an integer from 0 to {MAX_SEED}")

    @property
    def framing(self):
        return Framing(parse_size(self.image_size), self.resize, self.tile, self.tile_overlap)


def fit(data, model="patchcore", options=None, **overrides):
    """Fit `model` on the normal images of `data` (an MVTec category folder, a folder of
    images, or a list of image paths) and calibrate its threshold on a held-out part.
    options: RunOptions (default: its defaults), with any of its fields overridden by
    keyword, e.g. fit(data, "padim", backbone="resnet18", image_size=224)."""
    o = dataclasses.replace(options or RunOptions(), **overrides)
    framing, batch_size = o.framing, o.batch_size
    config = make_config(model, o.settings, backbone=o.backbone, epochs=o.epochs)
    paths, layout = training_set(data)
    if o.max_train is not None:
        if o.max_train < 2:
            raise VadError(f"--max-train {o.max_train}: give at least 2 images")
        if o.max_train < len(paths):
            keep = torch.randperm(len(paths), generator=torch.Generator().manual_seed(o.seed))[: o.max_train]
            paths = [paths[i] for i in sorted(keep.tolist())]
    if not 0 <= o.holdout < 1:
        raise VadError(f"--holdout {o.holdout}: must be in [0, 1)")
    fit_idx, held_idx = split_holdout(len(paths), o.holdout, o.seed)
    if not held_idx:
        warn(f"no held-out images ({len(paths)} image(s), --holdout {o.holdout}): the threshold is calibrated "
             f"on the training images themselves and will be too low")
        held_idx = fit_idx
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)  # random-init backbones (--weights none) depend on it
        try:
            detector = DETECTORS[model](config, framing.input_size, o.weights).to(pick_device(o.device))
        except ValueError as e:
            raise VadError(f"{model} settings: {e}") from None
    detector.framing = framing
    detector.set_precision(pick_precision(o.precision, detector.device))
    features = f"{config.backbone}, weights {o.weights}" if hasattr(config, "backbone") else "no pretrained backbone"
    size = "x".join(map(str, framing.size)) + " px" if framing.size else "native size"
    tiles = f", tiles of {o.tile} px" if o.tile else ""
    note(f"fit {model} on {len(fit_idx)} images, {len(held_idx)} held out for the threshold "
         f"({features}, {size} {o.resize}{tiles}, {detector.precision}, {detector.device})")
    detector.fit(load_images([paths[i] for i in fit_idx], framing, batch_size, "features"), o.seed)
    held = [paths[i] for i in held_idx]
    detector.fit_normalization(load_images(held, framing, batch_size, "held-out maps"))
    set_thresholds(detector, every_image(score_files(detector, held, batch_size, "held-out")))
    root = None if isinstance(data, (list, tuple)) else Path(data)
    detector.info = {"data": str(data) if root else f"{len(paths)} images",
                     "weights": str(o.weights), "seed": o.seed, "holdout": o.holdout, "images": len(fit_idx),
                     "held_out": len(held_idx), "added": 0, "layout": layout,
                     "data_fingerprint": data_fingerprint(paths, root),
                     "settings": json.dumps(dataclasses.asdict(config)),  # exports carry info, not the config
                     **(weights_record(o.weights, config.backbone) if hasattr(config, "backbone") else {}),
                     **frr_record(detector.held_out_scores.cpu().numpy(), float(detector.threshold),
                                  HELD_OUT_RULE)}
    detector.info = with_history(detector.info, event="fit", images=len(fit_idx), held_out=len(held_idx),
                                 threshold=float(detector.threshold), rule=HELD_OUT_RULE)
    note(frr_text(detector.info) + f", on the {len(held_idx)} held-out images")
    return detector


def training_set(data):
    """The normal training images of `data` (an MVTec-like category folder, a folder of
    images, or a list of image paths) and the layout they were read in."""
    if isinstance(data, (list, tuple)):
        return list(data), "list of images"
    dataset = read_dataset(data)
    note(f"--data {data}: {dataset.layout}, {len(dataset.train)} good training images")
    return dataset.train, dataset.layout


def training_images(data):
    return training_set(data)[0]


def set_thresholds(detector, scored):
    """Add the held-out images' results (a list of Scored) to those the detector keeps,
    and derive from all of them its image threshold and pixel threshold (threshold_from
    on the scores and on each map's maximum) and map_low, the median of each map's
    median (not the median of all their pixels, which the per-image values could not
    give again after an update)."""
    new = torch.tensor([[r.score, np.nanmax(r.anomaly_map), np.nanmedian(r.anomaly_map)] for r in scored],
                       dtype=torch.float64, device=detector.device).reshape(-1, 3)
    for column, name in enumerate(("held_out_scores", "held_out_maxima", "held_out_medians")):
        setattr(detector, name, torch.cat([getattr(detector, name), new[:, column]]))
    if len(detector.held_out_scores):
        detector.threshold.fill_(threshold_from(detector.held_out_scores.cpu().numpy()))
        detector.pixel_threshold.fill_(threshold_from(detector.held_out_maxima.cpu().numpy()))
        detector.map_low.fill_(float(np.median(detector.held_out_medians.cpu().numpy())))


def update(detector, data, batch_size=BATCH_SIZE):
    """Add the normal images of `data` (as fit() takes it) to a fitted PaDiM or PatchCore,
    in place: the model's own held-out fraction and seed split them, the fitted part goes
    into the fitted state (the detector's update()) and the held-out part's scores join
    the stored ones, from which set_thresholds derives the thresholds again (the stored
    scores are those of the model they were calibrated with: the old images are gone).
    Detectors that train refuse. On any error the detector is left as it was."""
    info = detector.info
    seed, holdout = info.get("seed"), info.get("holdout")
    if not (all(type(info.get(k)) is int for k in ("seed", "images", "held_out", "added"))
            and type(holdout) in (int, float) and 0 <= holdout < 1):
        raise VadError("the model's info does not say how it was fitted (seed, held-out fraction, image counts); "
                       "fit it again")
    paths = training_images(data)
    fit_idx, held_idx = split_holdout(len(paths), holdout, seed)
    note(f"add {len(fit_idx)} images to the {detector.name} model, {len(held_idx)} to its held-out images")
    before = dict(detector.named_buffers())  # update() and set_thresholds assign new tensors to the fitted ones
    try:
        detector.update(load_images([paths[i] for i in fit_idx], detector.framing, batch_size, "features"), seed)
        scored = every_image(score_files(detector, [paths[i] for i in held_idx], batch_size, "held-out"))
    except BaseException:
        for name, tensor in before.items():
            module, _, leaf = name.rpartition(".")
            detector.get_submodule(module)._buffers[leaf] = tensor
        raise
    set_thresholds(detector, scored)
    if "calibrated" in info:
        warn(f"the threshold set by calibrate ({info['calibrated']}) is replaced by the held-out one; "
             f"run calibrate again")
    detector.info = {k: v for k, v in info.items() if k != "calibrated"} | {
        "images": info["images"] + len(fit_idx), "held_out": info["held_out"] + len(held_idx),
        "added": info["added"] + len(paths)}
    detector.info = with_history(detector.info | frr_record(detector.held_out_scores.cpu().numpy(),
                                                            float(detector.threshold), HELD_OUT_RULE),
                                 event="update", added=len(paths), held_out=len(held_idx),
                                 threshold=float(detector.threshold), rule=HELD_OUT_RULE)
    return detector


def update_support(detector):
    """How `fit --update` would add images to this model, in a word or three (for `info`
    and the README): "exact", the fit on all the images (bit for bit when the batches
    split alike: a PaDiM with updatable=true); "to fp32 rounding" (any other PaDiM, from
    its mean and Cholesky factors; a PatchCore that keeps every patch, from its centred
    bank); "union of coresets" (a thinned PatchCore: the new images are thinned on their
    own, the fit on all only where that fit would have closed a part); or "no"."""
    if isinstance(detector, PaDiM):
        if detector.config.updatable:
            return "exact"
        if detector.config.covariance == "oas" or type(detector.info.get("images")) is not int:
            try:  # OAS may have shrunk too far to give them back: try (L L^T over every position)
                with torch.no_grad():
                    detector.recovered_statistics()
            except VadError:
                return "no"
        return "to fp32 rounding"
    if isinstance(detector, PatchCore):
        return "to fp32 rounding" if detector.config.coreset_ratio == 1 else "union of coresets"
    return "no"


def auroc(scores, labels):
    """Area under the ROC curve, exact and tie-aware: the Mann-Whitney U statistic with
    mid-ranks, i.e. P(score_pos > score_neg) + 0.5 P(tie). NaN if a class is missing."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    import scipy.stats  # metrics are for bench only; scipy stays off the scoring path

    ranks = scipy.stats.rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def aupro(maps, masks, max_fpr=0.3):
    """Area under the per-region-overlap curve up to max_fpr, divided by max_fpr (MVTec
    AD paper, sec. 4.2). At each threshold, PRO is the mean over connected defect regions
    (8-connectivity, all images) of the fraction of the region above the threshold, and
    FPR the fraction of all defect-free pixels above it. Exact: every distinct score is a
    threshold; the curve is closed at max_fpr by linear interpolation."""
    import scipy.ndimage

    maps = np.asarray(maps, dtype=np.float64)
    inspected = np.isfinite(maps)  # NaN: a pixel that was not inspected (cropped away, letterbox)
    masks = np.asarray(masks, dtype=bool) & inspected
    maps = np.where(inspected, maps, -np.inf)
    weight = np.zeros(maps.shape)  # each region's pixels share 1/regions of the PRO
    regions = 0
    for i in range(len(masks)):
        labels, n = scipy.ndimage.label(masks[i], structure=np.ones((3, 3)))
        if n:
            sizes = np.bincount(labels.ravel())
            weight[i][labels > 0] = 1.0 / sizes[labels[labels > 0]]
            regions += n
    normal = ~masks & inspected
    if regions == 0 or not normal.any():
        return float("nan")
    order = np.argsort(-maps.ravel(), kind="stable")
    s = maps.ravel()[order]
    fpr = np.cumsum(normal.ravel()[order]) / normal.sum()
    pro = np.cumsum(weight.ravel()[order]) / regions
    last = np.r_[s[1:] != s[:-1], True]  # a threshold admits all of its ties at once
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    j = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:j], pro[:j]
    if j < len(fpr):
        t = (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.r_[x, max_fpr], np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return float(np.trapezoid(y, x) / max_fpr)


def classification(scores, labels, threshold):
    """Precision, recall, F1 and accuracy when score > threshold means anomalous."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pred = s > threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": float((pred == y).mean())}


def _f1_curve(scores, labels):
    """(the distinct scores, highest first; the F1 when every score at or above each one
    is called anomalous), in one sort."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]
    return s[last], 2 * tp[last] / (tp[last] + fp[last] + y.sum())


def f1_max(scores, labels):
    """The best F1 over every threshold on these scores. An oracle: it looks at the test
    labels, so it bounds what a threshold could do; it is not a deployable number."""
    _, f1 = _f1_curve(scores, labels)
    return float(f1.max()) if np.any(labels) else 0.0


def threshold_for_frr(good, target_frr):
    """The lowest threshold at which at most a fraction target_frr of the good scores are
    above it (rejected): the (k+1)-th largest good score, k = floor(target_frr * n)."""
    s = np.sort(np.asarray(good, dtype=np.float64))[::-1]
    return float(s[min(int(math.floor(target_frr * len(s) + 1e-9)), len(s) - 1)])


def threshold_for_f1(good, bad):
    """The threshold with the best F1 on labelled scores (anomalous = score > threshold):
    each candidate sits half-way between two neighbouring distinct scores, and on a tie
    the highest threshold wins (fewer false rejects)."""
    values, f1 = _f1_curve(np.r_[good, bad], np.r_[np.zeros(len(good), bool), np.ones(len(bad), bool)])
    i = int(np.argmax(f1))  # the first best, highest first: the highest threshold
    below = values[i + 1] if i + 1 < len(values) else values[i] - 1.0
    return float((values[i] + below) / 2)


def confusion(good, bad, threshold):
    """Counts at a threshold: good images passed and rejected, bad ones caught and missed."""
    good, bad = np.asarray(good), np.asarray(bad)
    return {"good_ok": int((good <= threshold).sum()), "good_rejected": int((good > threshold).sum()),
            "bad_caught": int((bad > threshold).sum()), "bad_missed": int((bad <= threshold).sum())}


def _stack_padded(maps, fill):
    """Arrays of possibly different (H, W) -> one (N, H_max, W_max) array, padded with fill
    ((0, 0, 0) for none: a test set of unmasked defects only has no pixel metrics)."""
    if not maps:
        return np.full((0, 0, 0), fill)
    H, W = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
    out = np.full((len(maps), H, W), fill, dtype=maps[0].dtype)
    for i, m in enumerate(maps):
        out[i, : m.shape[0], : m.shape[1]] = m
    return out


def evaluate(detector, dataset, batch_size=BATCH_SIZE):
    """Score the labelled test images of an MVTec-layout dataset and compute every metric.
    Pixel metrics count the inspected pixels of the working frame (not letterbox borders
    or cropped-away parts)."""
    if not dataset.test:
        raise VadError(f"{dataset.root} has no test/ images to evaluate on (MVTec AD layout expected)")
    check_masks(dataset)
    start = time.perf_counter()
    scored = every_image(score_files(detector, dataset.test, batch_size, "score"))
    seconds = time.perf_counter() - start
    scores, labels = np.array([r.score for r in scored]), np.array(dataset.labels)
    known = [i for i, (y, m) in enumerate(zip(labels, dataset.masks)) if y == 0 or m is not None]
    maps = _stack_padded([scored[i].anomaly_map for i in known], np.float32("nan"))
    masks = _stack_padded([read_mask(dataset.masks[i], detector.framing).numpy() if labels[i] else
                           np.zeros(scored[i].anomaly_map.shape, bool) for i in known], False)
    inspected = np.isfinite(maps)
    result = {
        "image_auroc": auroc(scores, labels),
        "pixel_auroc": auroc(maps[inspected], masks[inspected]),
        "aupro": aupro(maps, masks),
        **classification(scores, labels, float(detector.threshold)),
        "f1_max_oracle": f1_max(scores, labels),
        "threshold": float(detector.threshold),
        "score_ms_per_image": 1000 * seconds / len(scores),
    }
    return result


# Drift: do the line's images still score like the held-out ones?
#
# The reference is the k-th smallest of the n held-out scores, k = ceil(0.95 (n + 1)) (at
# most n): their 95th percentile, as an order statistic. While nothing changes, a new
# image's score and the held-out ones are exchangeable, so the chance p that a new score
# exceeds the k-th is itself random, Beta(n + 1 - k, k) (the order statistics of a
# uniform sample: the argument behind conformal prediction, Vovk, Gammerman & Shafer,
# "Algorithmic Learning in a Random World", 2005), with mean (n + 1 - k) / (n + 1): 4.5%
# for 21 held-out images. The count X of N new scores above it is then beta-binomial, not
# binomial: a binomial test at the mean rate forgets that 21 scores place a percentile
# only roughly, and on unchanged lines it cries drift for about 1 model in 5 (window 500,
# p < 0.001; scipy). Drift is declared when P(X >= x) < DRIFT_P under the beta-binomial.
# Exchangeable, nearly: EfficientAD and the autoencoder also standardize their maps on the
# held-out images, and `fit --update` keeps scores from the model as it was; both can
# leave new good scores a little above the held-out ones, and the test a little eager.
#
# Deviation from issue 21, which counts good-verdict scores only: every score counts.
# The threshold sits just above q (with up to 38 held-out images q is their maximum, the
# threshold 10% of their spread higher: threshold_from), so a shift carries scores past
# both at once and the good-verdict ones barely move: bottle brightened x1.3 puts 8 of
# 20 scores above q but 2 of 14 good-verdict ones (README, "Drift on the line"). The
# price: a batch with many defects also reads as drift, and the warning says so.

DRIFT_PERCENTILE = 95  # of the held-out scores: the reference a new score should rarely pass
DRIFT_P = 0.001  # the tail probability below which the scores have drifted
DRIFT_WINDOW = 500  # verdicts that serve keeps per model (a few hours of a slow line, minutes of a fast one)


def beta_binomial_tail(x, n, a, b):
    """P(X >= x) for X ~ BetaBinomial(n, a, b): the sum of C(n, j) B(j + a, n - j + b) / B(a, b)
    over j = x..n, each term in logs (lgamma), so that n in the hundreds of thousands
    neither overflows nor underflows."""
    if x <= 0:
        return 1.0
    if x > n:
        return 0.0

    def log_beta(p, q):
        return math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + log_beta(j + a, n - j + b)
            - log_beta(a, b) for j in range(x, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


@dataclass(frozen=True)
class DriftReference:
    """The held-out percentile a new score is compared with, and what it implies."""
    score: float  # q, the k-th smallest held-out score
    rank: int  # k
    held_out: int  # n

    @property
    def expected(self):
        """The mean chance that an unchanged score exceeds q: (n + 1 - k) / (n + 1)."""
        return (self.held_out + 1 - self.rank) / (self.held_out + 1)

    def p_value(self, above, scored):
        """P(at least `above` of `scored` unchanged scores exceed q) (beta-binomial, above)."""
        return beta_binomial_tail(above, scored, self.held_out + 1 - self.rank, self.rank)


def drift_reference(detector):
    """The DriftReference of a detector's held-out scores, or None for a model without
    them (an exported .onnx keeps only its thresholds)."""
    scores = getattr(detector, "held_out_scores", None)
    if scores is None or not len(scores):
        return None
    s = np.sort(scores.detach().cpu().numpy())
    n = len(s)
    k = min(n, -(-DRIFT_PERCENTILE * (n + 1) // 100))  # ceil in integers: 0.95 * 20 is not 19 in floats
    return DriftReference(float(s[k - 1]), k, n)


class DriftMonitor:
    """Counts of a run of verdicts, for score's summary line and serve's /metrics and
    /health: totals of scored, anomalous and unreadable images, and over the last
    `window` verdicts (None: all of them) how many scores, and how many good-verdict
    scores, exceed the held-out percentile. Not thread-safe: serve holds a lock around it."""

    def __init__(self, detector, window=None):
        self.reference, self.window = drift_reference(detector), window
        self.scored = self.anomalous = self.errors = 0
        self.recent = collections.deque()  # (good verdict, above q) of each verdict in the window
        self.good = self.above = self.good_above = 0  # in the window

    def add(self, result):
        """Count one Scored."""
        if result.error:
            self.errors += 1
            return
        ok = result.verdict == "ok"
        above = self.reference is not None and result.score > self.reference.score
        self.scored += 1
        self.anomalous += not ok
        self._count((ok, above), 1)
        if self.window is not None and len(self.recent) > self.window:
            self._count(self.recent.popleft(), -1)

    def _count(self, item, sign):
        if sign > 0:
            self.recent.append(item)
        ok, above = item
        self.good, self.above, self.good_above = (self.good + sign * ok, self.above + sign * above,
                                                  self.good_above + sign * (ok and above))

    @property
    def in_window(self):
        return len(self.recent)

    @property
    def p_value(self):
        return 1.0 if self.reference is None else self.reference.p_value(self.above, self.in_window)

    @property
    def drift(self):
        return self.p_value < DRIFT_P

    def share(self):
        """'x of N scores (s%), y of M good-verdict ones' of the window."""
        return (f"{self.above} of {self.in_window} scores ({100 * self.above / max(self.in_window, 1):.1f}%), "
                f"{self.good_above} of {self.good} good-verdict ones")

    def summary(self):
        """The line that ends `score`: counts, then the drift check or why there is none."""
        counts = f"scored {self.scored}, anomalous {self.anomalous}, errors {self.errors}"
        if not self.in_window:
            return f"{counts}; drift not checked: no image was scored"
        if self.reference is None:
            return (f"{counts}; drift not checked: the model holds no held-out scores (an export keeps only its "
                    f"thresholds; score the .pt)")
        r = self.reference
        return (f"{counts}; {self.share()}, above the held-out {DRIFT_PERCENTILE}th percentile {r.score:.6g}, "
                f"where {100 * r.expected:.1f}% is expected from {r.held_out} held-out scores (beta-binomial "
                f"p = {self.p_value:.2g})")

    def warning(self):
        """The drift warning, or None."""
        if not self.drift:
            return None
        r = self.reference
        return (f"drift: {self.share()}, are above the held-out {DRIFT_PERCENTILE}th percentile {r.score:.6g}, "
                f"where {100 * r.expected:.1f}% is expected (beta-binomial p = {self.p_value:.2g} < {DRIFT_P}): "
                f"these images do not score like the held-out good images; if they are not mostly defects, "
                f"find what changed on the line (lighting, camera, supplier) or fit again on its current good images")

# =============================================================================
# Tools: export, bench, heat maps, serving and the CLI, built on the core above.
# Nothing above this line refers to anything below it (test_core_never_refers_to_the_tools).
# =============================================================================

# -----------------------------------------------------------------------------
# Export: one ONNX graph per model, checked against the .pt before it is written
#
# An exported graph takes model inputs as score() does, images (N, 3, H, W) float32 RGB
# in [0, 1] at the model's input size (the ImageNet normalization is inside), and
# returns (scores (N,), maps (N, H, W)). Framing, thresholds and provenance travel in
# its metadata, so ONNX Runtime alone can score with it (README, "Export to ONNX").

ONNX_FORMAT = "vad-onnx"
ONNX_FORMAT_VERSION = 1
ONNX_OPSET = 17
ONNX_EXTRAS = "pip install onnx onnxruntime"
EXPORT_TOLERANCE = {"scores": 1e-4, "maps": 1e-3}  # largest difference, relative to the largest value
ONNX_META_KEYS = {"format", "format_version", "vad_version", "detector", "backbone", "input_size", "framing",
                  "threshold", "pixel_threshold", "map_low", "image_score", "info", "source_sha256", "parity"}


def optional_import(module):
    """An optional package (export, .onnx scoring), or one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VadError(f"this needs {module}, which is not installed: {ONNX_EXTRAS}") from None


def nearest_indices(n, size):
    """The source index of each of `size` samples when torch resizes n samples with
    mode="nearest": resampling becomes a gather, which ONNX runs exactly as torch does."""
    return F.interpolate(torch.arange(n, dtype=torch.float32)[None, None], size=size, mode="nearest")[0, 0].long()


class PaDiMGraph(nn.Module):
    """PaDiM's score in ONNX's operators: the chosen channels and the nearest-neighbour
    resampling to layer 1's grid as gathers by fixed indices, and the Mahalanobis
    distance as |(x - mu) L^-T| with the inverse Cholesky factors formed once, in fp64
    (ONNX has no triangular solve). Positions lead for the batched product, reached by
    one 2-D transpose (ONNX Runtime's fastest)."""

    def __init__(self, padim):
        super().__init__()
        self.padim = padim
        shapes = padim.backbone.grids(padim.input_size)
        self.grid = shapes[0]
        self.gathers, offset = [], 0
        for C, (h, w) in zip(padim.backbone.channels, shapes):
            own = padim.channels[(padim.channels >= offset) & (padim.channels < offset + C)] - offset
            rows, cols = nearest_indices(h, self.grid[0]), nearest_indices(w, self.grid[1])
            positions = (rows[:, None] * w + cols[None, :]).flatten()  # on layer 1's grid, row-major
            self.gathers.append((None if len(own) == C else own,  # None: no gather needed
                                 None if (h, w) == self.grid else positions))
            offset += C
        eye = torch.eye(padim.config.d, dtype=torch.float64).expand_as(padim.cholesky)
        inverse = torch.linalg.solve_triangular(padim.cholesky.double(), eye, upper=False)
        self.register_buffer("inverse_t", inverse.transpose(1, 2).float().contiguous())  # (P, d, d): L^-T

    def forward(self, images):
        parts = []
        for f, (own, positions) in zip(self.padim.backbone(images), self.gathers):
            f = (f if own is None else f.index_select(1, own)).flatten(2)
            parts.append(f if positions is None else f.index_select(2, positions))
        x = torch.cat(parts, 1)  # (B, d, P)
        d, P = x.shape[1], x.shape[2]
        x = x.reshape(-1, P).T.reshape(P, -1, d)  # (P, B, d)
        dist = ((x - self.padim.mean[:, None]) @ self.inverse_t).square().sum(2).sqrt()  # (P, B)
        maps = upsample_and_blur(dist.T.reshape(-1, *self.grid), self.padim.input_size, self.padim.config.blur_sigma)
        return maps.amax((1, 2)), maps


class PatchCoreGraph(nn.Module):
    """PatchCore's score in ONNX's operators: the same patch features, and each nearest
    neighbour by exhaustive search over blocks of bank rows. The cell search prunes with
    data-dependent control flow; visiting every row finds the same neighbours, up to
    floating-point ties, and the winner's distance is recomputed directly as there.
    Then eq. 7, as PatchCore.score."""

    def __init__(self, patchcore, batch=BATCH_SIZE):
        super().__init__()
        self.patchcore = patchcore
        shapes = patchcore.backbone.grids(patchcore.input_size)
        (h, w), C = shapes[0], sum(patchcore.backbone.channels)
        self.grid = (h, w)
        # bilinear resampling of the deeper layers as two small matrix products, torch's weights exactly
        self.resample = [None if s == (h, w) else (upsample_matrix(s[0], h).float(), upsample_matrix(s[1], w).float())
                         for s in shapes]
        e = patchcore.config.embed_dim  # adaptive average pooling over channels is linear: a (C, e) matrix
        self.pool = F.adaptive_avg_pool1d(torch.eye(C)[:, None], e)[:, 0] if e else None
        self.block = max(256, CHUNK_BYTES // (4 * batch * h * w))  # bank rows per block of the search
        self.register_buffer("bank_sq", torch.linalg.vector_norm(patchcore.memory_bank, dim=1).square())

    def forward(self, images):
        pc, bank = self.patchcore, self.patchcore.memory_bank
        parts = []
        for f, resample in zip(pc.backbone(images), self.resample):
            f = F.avg_pool2d(f, 3, 1, 1)  # as PatchCore.embed: sec. 3.1, zero padded
            parts.append(f if resample is None else resample[0] @ f @ resample[1].T)
        x = torch.cat(parts, 1).permute(0, 2, 3, 1)  # (B, h, w, C)
        if self.pool is not None:
            x = x @ self.pool
        hw, C = self.grid[0] * self.grid[1], x.shape[-1]
        patches = x.reshape(-1, C) - pc.bank_origin  # (B*h*w, C)
        found, index = [], []
        for a in range(0, len(bank), self.block):
            best, i = ranking_distances(patches, bank[a: a + self.block], self.bank_sq[a: a + self.block]).min(1)
            found.append(best)
            index.append(i + a)
        nearest = torch.stack(index, 1).gather(1, torch.stack(found, 1).argmin(1, keepdim=True))[:, 0]
        dist = torch.linalg.vector_norm(patches - bank[nearest], dim=1).reshape(-1, hw)  # (B, h*w)
        maps = upsample_and_blur(dist.reshape(-1, *self.grid), pc.input_size, pc.config.blur_sigma)
        worst = dist.argmax(1, keepdim=True)  # (B, 1)
        s_star = dist.gather(1, worst)[:, 0]
        k = min(pc.config.num_neighbors, len(bank))
        if k < 2:
            return s_star, maps
        m_test = patches.reshape(-1, hw, C).gather(1, worst[..., None].repeat(1, 1, C))[:, 0]  # (B, C)
        m_star = bank[nearest.reshape(-1, hw).gather(1, worst)[:, 0]]
        support = ranking_distances(m_star, bank, self.bank_sq).topk(k, dim=1, largest=False).indices  # (B, k)
        d = torch.linalg.vector_norm(m_test[:, None] - bank[support], dim=2)
        return (1 - torch.exp(s_star - torch.logsumexp(d, 1))) * s_star, maps


class ScoreGraph(nn.Module):
    """A detector whose score() is made of ONNX's operators already (EfficientAD: two
    networks and their fused maps; the autoencoder with its SSIM map)."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images):
        return self.detector.score(images)


GRAPHS = {"padim": PaDiMGraph, "patchcore": PatchCoreGraph, "efficientad": ScoreGraph, "autoencoder": ScoreGraph}


def image_score_rule(detector):
    """How a stitched or letterboxed map is scored (Detector.map_score): "max" or "topk:K"."""
    config = detector.config
    return f"topk:{config.top_k}" if getattr(config, "image_score", "max") == "topk" else "max"


def parity_inputs(detector, check_images=(), count=8, seed=0):
    """Model inputs for the export check: `count` synthetic ones at the input size
    (smooth random textures, noise, flat grey: what a model sees and what it never
    does), then those of `check_images` (paths) as the model's framing cuts them."""
    g = torch.Generator().manual_seed(seed)
    H, W = detector.input_size
    inputs = []
    for i in range(count):
        if i % 4 == 3:
            inputs.append(torch.rand(3, H, W, generator=g))
        else:
            coarse = torch.rand(1, 3, H // 2 ** (i % 4 + 2) + 2, W // 2 ** (i % 4 + 2) + 2, generator=g)
            inputs.append(F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)[0])
    inputs.append(torch.full((3, H, W), 0.5))
    for f in read_frames(list(check_images), detector.framing):
        if f.error:
            raise VadError(f"--check-images: {f.error}")
        inputs.extend(torch.from_numpy(t) for t in f.tiles)
    return torch.stack(inputs)


def _scores_in_batches(model, inputs, batch_size):
    with torch.no_grad():
        return [torch.cat(t) for t in zip(*(model.score(inputs[a: a + batch_size])
                                             for a in range(0, len(inputs), batch_size)))]


def export(detector, check_images=(), batch_size=BATCH_SIZE):
    """The detector as ONNX file bytes, with its framing, thresholds and provenance in the
    metadata. ONNX Runtime then runs the graph on parity_inputs() beside
    detector.score(): VadError, and no bytes, unless the image scores agree to 1e-4 and
    the maps to 1e-3, each relative to the largest value (anomalib's users' worst export
    bug was scores that changed on the way)."""
    onnx = optional_import("onnx")
    optional_import("onnxruntime")
    if detector.precision != "fp32" or detector.device.type != "cpu":
        raise VadError(f"export needs an fp32 model on the CPU; this one scores in {detector.precision} on "
                       f"{detector.device.type}: load it with --precision fp32 --device cpu, or fit it in fp32")
    inputs = parity_inputs(detector, check_images)
    # The reference first: it also builds the cached map matrices (upsample_and_blur),
    # which the trace must meet as constants, not as operations to export.
    reference = _scores_in_batches(detector, inputs, batch_size)
    graph = GRAPHS[detector.name](detector.eval()).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
        torch.onnx.export(graph, (torch.zeros(2, 3, *detector.input_size),), buffer, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["images"], output_names=["scores", "maps"],
                          dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}})
    model = onnx.load_model_from_string(buffer.getvalue())
    meta = {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "vad_version": __version__,
            "detector": detector.name, "backbone": getattr(detector.config, "backbone", "-"),
            "input_size": list(detector.input_size), "framing": dataclasses.asdict(detector.framing),
            "threshold": float(detector.threshold), "pixel_threshold": float(detector.pixel_threshold),
            "map_low": float(detector.map_low), "image_score": image_score_rule(detector), "info": detector.info,
            "source_sha256": detector.sha256, "parity": None}
    entries = {}
    for key, value in meta.items():
        entries[key] = model.metadata_props.add()
        entries[key].key, entries[key].value = f"vad.{key}", json.dumps(value)
    exported = OnnxModel(model.SerializeToString())  # its metadata checked as any .onnx file's
    differences = {}
    for name, ours, theirs in zip(("scores", "maps"), _scores_in_batches(exported, inputs, batch_size), reference):
        scale = float(theirs.abs().max())
        differences[name] = float((ours - theirs).abs().max()) / (scale if scale > 0 else 1.0)
    text = ", ".join(f"{k} {v:.2g}" for k, v in differences.items())
    if not all(v <= EXPORT_TOLERANCE[k] for k, v in differences.items()):
        raise VadError(f"the exported graph does not score as the model does on {len(inputs)} inputs (largest "
                       f"difference, relative to the largest value: {text}; allowed: scores 1e-4, maps 1e-3); "
                       f"nothing written")
    note(f"parity on {len(inputs)} inputs: largest difference, relative to the largest value: {text}")
    entries["parity"].value = json.dumps(f"{text} (largest difference relative to the largest value, "
                                         f"{len(inputs)} inputs, ONNX Runtime {exported.runtime_version} vs torch)")
    return model.SerializeToString()


def save_onnx(data, path):
    """Write exported bytes to path, atomically."""
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as e:
        raise VadError(f"could not write {path}: {e.strerror or e}") from None


def is_vad_export(path):
    """Whether `path` is a file export wrote, judged without parsing it: an .onnx file
    whose metadata, at its end (protobuf writes fields in order), names vad's format."""
    try:
        with open(path, "rb") as f:
            if Path(path).suffix.lower() != ".onnx" or not Path(path).is_file():
                return False
            head = f.read(1)  # a ModelProto starts with field 1, ir_version: tag 0x08
            f.seek(max(0, os.fstat(f.fileno()).st_size - 2**20))
            tail = f.read()
        return head == b"\x08" and b"vad.format" in tail and json.dumps(ONNX_FORMAT).encode() in tail
    except OSError:
        return False


# Where an ONNX file can hold a tensor, as (message, field number) -> the message there
# (onnx.proto3: ModelProto.graph 7 and functions 25; GraphProto.node 1, initializer 5,
# sparse_initializer 15; NodeProto.attribute 5; AttributeProto.t 5, g 6, tensors 10,
# graphs 11, sparse_tensor 22, sparse_tensors 23; FunctionProto.node 7;
# SparseTensorProto.values 1, indices 2).
ONNX_TENSOR_PLACES = {
    "model": {7: "graph", 25: "function"}, "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"}, "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                                            23: "sparse"},
    "function": {7: "node"}, "sparse": {1: "tensor", 2: "tensor"}}


def onnx_external_tensors(data, start=0, end=None, kind="model", depth=0):
    """Whether tensors of an ONNX file (its bytes or an mmap of it; the message from
    start to end) keep their data in another file (nonzero: the count of TensorProto.external_data (13) entries and
    data_location (14) = EXTERNAL fields), read from the protobuf wire format itself:
    ONNX Runtime would open such a file, of any size, beside the model or in the working
    folder. Raises ValueError for bytes that do not parse or nest over 32 graphs deep."""
    if depth > 32:
        raise ValueError("graphs nested over 32 deep")
    found, i, n = 0, start, len(data) if end is None else end

    def varint():
        nonlocal i
        value = shift = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("truncated protobuf")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
    while i < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
            found += kind == "tensor" and number == 14 and value == 1
        elif wire == 2:
            length = varint()
            if i + length > n:
                raise ValueError("truncated protobuf")
            inner = ONNX_TENSOR_PLACES.get(kind, {}).get(number)
            if inner:
                found += onnx_external_tensors(data, i, i + length, inner, depth + 1)
            found += kind == "tensor" and number == 13
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
    return found


class OnnxModel:
    """An exported model run by ONNX Runtime, with what scoring needs of a Detector
    (framing, thresholds, score, map_score) read from the file alone. Like a .pt, an
    .onnx file is input that may be crafted: its size is bounded, every metadata field
    is checked, and its input and outputs must be the ones export writes."""
    precision = "fp32"
    device = torch.device("cpu")

    def __init__(self, source):
        ort = optional_import("onnxruntime")
        ort.set_default_logger_severity(3)  # errors reach the user as vad's one line, not ONNX Runtime's log
        label = self.label = "the exported graph" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes):
            path = check_model_path(source)
            if path.stat().st_size > MAX_MODEL_BYTES:
                raise VadError(f"{path} is {path.stat().st_size:,} bytes, over vad's limit of {MAX_MODEL_BYTES:,}")
            source = str(path)
            try:
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    external = onnx_external_tensors(data)
            except (OSError, ValueError) as e:
                raise VadError(f"{label} is not a model ONNX Runtime can run ({e}); export one with "
                               f"'vad.py export'") from None
            if external:  # export writes every tensor into the one file; another file is unbounded
                raise VadError(f"{label} keeps tensors in other files (ONNX external data), which "
                               f"'vad.py export' never writes; export the model again")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as torch is told, by OMP_NUM_THREADS or the CPU
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime reports a bad file with its own exception types
            reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            raise VadError(f"{label} is not a model ONNX Runtime can run ({reason}); export one with "
                           f"'vad.py export'") from None
        raw = self.session.get_modelmeta().custom_metadata_map
        try:
            meta = {k[4:]: json.loads(v, parse_constant=_not_finite) for k, v in raw.items() if k.startswith("vad.")}
            self._check(meta)
        except (ValueError, TypeError, KeyError, RecursionError) as e:  # RecursionError: deeply nested JSON
            raise VadError(f"{label} is not a vad model exported by 'vad.py export' ({str(e)[:200]})") from None
        self.name = meta["detector"]
        self.config = types.SimpleNamespace(backbone=meta["backbone"])
        self.framing = framing_from_record(meta["framing"])
        self.input_size = self.framing.input_size
        self.threshold = torch.tensor(float(meta["threshold"]))
        self.pixel_threshold = torch.tensor(float(meta["pixel_threshold"]))
        self.map_low = torch.tensor(float(meta["map_low"]))
        rule = meta["image_score"]
        self.top_k = 1 if rule == "max" else int(rule.split(":")[1])
        self.info = meta["info"]
        self.vad_version, self.sha256, self.parity = meta["vad_version"], meta["source_sha256"], meta["parity"]
        self.runtime_version = ort.__version__

    def _check(self, meta):
        """Raise ValueError unless the metadata and the graph's signature are export's."""
        if meta.get("format") != ONNX_FORMAT:
            raise ValueError("no vad metadata")
        version = meta.get("format_version")
        if type(version) is not int or version != ONNX_FORMAT_VERSION:
            raise ValueError(f"export format version {version!r}, this vad reads {ONNX_FORMAT_VERSION}; "
                             f"export it again with this vad")
        if set(meta) != ONNX_META_KEYS:
            raise ValueError(f"unexpected metadata keys {sorted(set(meta) ^ ONNX_META_KEYS)}")
        if not isinstance(meta["detector"], str) or meta["detector"] not in DETECTORS:
            raise ValueError(f"unknown detector {meta['detector']!r}")
        for key in ("backbone", "vad_version", "source_sha256", "parity"):
            if not (isinstance(meta[key], str) and len(meta[key]) <= 4096 or meta[key] is None and key != "backbone"):
                raise ValueError(f"{key} {str(meta[key])[:100]!r} is not a short string")
        framing, size = framing_from_record(meta["framing"]), meta["input_size"]
        if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v >= 1 for v in size)
                and size[0] * size[1] <= MAX_PIXELS):
            raise ValueError(f"its input size is not (H, W), or over {MAX_PIXELS:,} pixels")
        if list(framing.input_size) != size:
            raise ValueError("its input size does not match its framing")
        for key in ("threshold", "pixel_threshold", "map_low"):
            if type(meta[key]) not in (int, float) or not math.isfinite(meta[key]):
                raise ValueError(f"{key} {meta[key]!r} is not a finite number")
        rule = meta["image_score"]
        if not (isinstance(rule, str) and re.fullmatch(r"max|topk:[1-9][0-9]{0,8}", rule)
                and (rule == "max" or int(rule[5:]) <= size[0] * size[1])):
            raise ValueError(f"image_score {rule!r} is not max or topk:K with K at most the map's pixels")
        check_info(meta["info"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        H, W = size
        if len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(float)" \
                or inputs[0].shape[1:] != [3, H, W]:
            shown = ", ".join(f"{x.name} {x.type} {x.shape}" for x in inputs) or "nothing"
            raise ValueError(f"its graph takes {shown}, not images float (N, 3, {H}, {W})")
        if [o.name for o in outputs] != ["scores", "maps"]:
            raise ValueError(f"its graph returns {', '.join(o.name for o in outputs) or 'nothing'}, "
                             f"not scores and maps")

    def score(self, images):
        try:
            scores, maps = self.session.run(["scores", "maps"], {"images": images.cpu().float().numpy()})
        except Exception as e:  # a graph that loads but fails to run (crafted, or damaged)
            raise VadError(f"{self.label} failed to run ({str(e).strip().splitlines()[-1][:300]})") from None
        if scores.dtype != np.float32 or maps.dtype != np.float32 or scores.shape != (len(images),) \
                or maps.shape != (len(images), *self.input_size):
            raise VadError(f"{self.label} returned scores {scores.dtype} {scores.shape} and maps {maps.dtype} "
                           f"{maps.shape}, not what export writes; export it again")
        if not (np.isfinite(scores).all() and np.isfinite(maps).all()):  # fail closed: NaN > threshold is False
            raise VadError(f"{self.label} returned NaN or infinite scores or maps; export it again")
        return torch.from_numpy(scores), torch.from_numpy(maps)

    def map_score(self, anomaly_map):
        return float(top_k_mean(anomaly_map.reshape(1, -1), self.top_k)[0])


def load_model(path, device="cpu", precision="model"):
    """A .pt (load) or an exported .onnx file (OnnxModel, run by ONNX Runtime on the CPU)."""
    if Path(path).suffix.lower() != ".onnx":
        return load(path, device, precision)
    if device not in ("auto", "cpu") or precision not in ("model", "fp32", "auto"):
        raise VadError(f"{path}: an exported model runs in fp32 on the CPU with ONNX Runtime; "
                       f"drop --device/--precision or score the .pt")
    return OnnxModel(path)

# -----------------------------------------------------------------------------
# Bench, and the embedded synthetic inspection set (a smoke test, not a benchmark)


def _draw_defect(kind, image, rng, center, radii, s):
    """Paint one defect of `kind` onto `image` (H, W, 3 float) at a distance in `radii`
    from `center`; return its mask."""
    H, W, _ = image.shape
    mask = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(mask)
    cy, cx = center
    angle = rng.uniform(0, 2 * np.pi)
    r = rng.uniform(*radii)
    y, x = cy + r * np.sin(angle), cx + r * np.cos(angle)
    if kind == "scratch":  # a thin straight bright line
        theta, length = rng.uniform(0, np.pi), rng.uniform(30, 60) * s
        dx, dy = np.cos(theta) * length / 2, np.sin(theta) * length / 2
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=255, width=max(1, round(2 * s)))
        shift = np.array([70.0, 70.0, 70.0])
    elif kind == "spot":  # a round stain of another colour
        rad = rng.uniform(6, 10) * s
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=255)
        shift = np.array([-60.0, -25.0, 20.0])
    else:  # crack: a dark jagged random walk
        points, theta = [(x, y)], rng.uniform(0, 2 * np.pi)
        for _ in range(8):
            theta += rng.uniform(-0.8, 0.8)
            x, y = x + np.cos(theta) * 7 * s, y + np.sin(theta) * 7 * s
            points.append((x, y))
        draw.line(points, fill=255, width=max(1, round(2 * s)))
        shift = np.array([-80.0, -80.0, -80.0])
    m = np.asarray(mask) > 0
    image[m] = image[m] + shift
    return m


def _synthetic_image(kind, rng, size):
    """A normal image (H, W, 3 float): a stochastic textured surface, or a washer-like part
    on a background; with the center and the range of radii where defects may go."""
    import scipy.ndimage  # here, not at the top: scipy costs start-up time that scoring never needs

    s = size / 256
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    grain = scipy.ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 2 * s) * 60 + rng.normal(0, 3, (size, size))
    if kind == "surface":
        phase = rng.uniform(0, 2 * np.pi)
        stripes = 8 * np.sin(2 * np.pi * (xx * 0.8 + yy * 0.6) / (12 * s) + phase)
        image = np.array([150.0, 138.0, 120.0]) + (grain + stripes)[..., None] * np.array([1.0, 0.95, 0.9])
        return image, (size / 2, size / 2), (0, 0.35 * size)
    cy, cx = size / 2 + rng.uniform(-3, 3) * s, size / 2 + rng.uniform(-3, 3) * s
    r = np.hypot(yy - cy, xx - cx)
    outer, inner = 0.36 * size, 0.14 * size
    ring = np.clip(outer - r + 0.5, 0, 1) * np.clip(r - inner + 0.5, 0, 1)  # anti-aliased annulus
    metal = 160 + 40 * np.cos(np.arctan2(yy - cy, xx - cx)) * (r / outer) + grain / 3
    image = (45 + grain / 4)[..., None] * (1 - ring[..., None]) + (metal[..., None] * np.array([1.0, 1.0, 1.05])) * ring[..., None]
    return image, (cy, cx), (inner + 0.05 * size, outer - 0.07 * size)  # defects on the part


def make_synthetic(root, kind="surface", size=256, n_train=24, n_good=8, n_defect=4, seed=0):
    """Write a small MVTec-layout category of `kind` ("surface" or "part") under `root`:
    normal training images, normal test images, and scratch/spot/crack test images with
    masks. Deterministic for a given seed."""
    root = Path(root)
    rng = np.random.default_rng([seed, 0 if kind == "surface" else 1])
    s = size / 256

    def write_png(image, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)

    for i in range(n_train):
        write_png(_synthetic_image(kind, rng, size)[0], root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        write_png(_synthetic_image(kind, rng, size)[0], root / "test" / "good" / f"{i:03d}.png")
    for defect in ("scratch", "spot", "crack"):
        for i in range(n_defect):
            image, center, radii = _synthetic_image(kind, rng, size)
            mask = _draw_defect(defect, image, rng, center, radii, s)
            write_png(image, root / "test" / defect / f"{i:03d}.png")
            write_png(mask * 255.0, root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def synthetic_data():
    """The embedded default data set: two small categories generated once into the cache."""
    base = CACHE_DIR / f"synthetic-v{FORMAT_VERSION}"
    if not (base / "complete").exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=base.parent))
        for kind in ("surface", "part"):
            make_synthetic(tmp / kind, kind)
        (tmp / "complete").write_text("vad synthetic smoke-test set\n")
        try:
            tmp.rename(base)
        except OSError:  # another process finished first; its copy is identical
            pass
    return [base / "surface", base / "part"]


def model_settings(model, settings):
    """The `-s` items for `model` when several models share one command line: those
    written MODEL.KEY=VALUE for it, and plain KEY=VALUE ones whose key it has."""
    fields = {f.name for f in dataclasses.fields(DETECTORS[model].Config)}
    mine = []
    for item in settings or ():
        key = item.partition("=")[0].strip()
        prefix, dot, _ = key.partition(".")
        if (dot and prefix == model) or (not dot and key in fields):
            mine.append(item)
    return mine


def check_settings(models, settings):
    """Every `-s` item must concern at least one of `models` (else a VadError naming the keys)."""
    for item in settings or ():
        if not any(model_settings(m, [item]) for m in models):
            keys = sorted({f.name for m in models for f in dataclasses.fields(DETECTORS[m].Config)})
            raise VadError(f"-s {item}: no such setting for {', '.join(models)}; settings are "
                           f"{', '.join(k + '=' for k in keys)} (MODEL.KEY=VALUE targets one model)")


class PeakMemory:
    """Context manager measuring the peak resident memory (bytes) of the block.

    Linux lets a process reset its high-water mark (write 5 to /proc/self/clear_refs),
    which makes the peak of one block exact. Elsewhere the process-wide peak is used.
    """

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        return self

    def __exit__(self, *exc):
        self.peak = None
        if self.exact:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) * 1024
        if self.peak is None:
            scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def machine():
    """Where a benchmark runs: CPU model, ISA level, threads, torch version."""
    return {"cpu": cpu_info()[0], "isa": isa_level(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "vad": __version__}


def cpu_seconds():
    """(CPU seconds the whole machine has been busy, of which this process) so far; None
    where /proc/stat is missing (not Linux). Steal time counts as busy: it is time a
    virtual machine's core was given to another guest."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _share(stages, seconds, *parts):
    """Percent of `seconds` not spent in the timed() stages `parts`: the detector's own work."""
    return 100 * max(0.0, seconds - sum(stages.get(p, 0.0) for p in parts)) / seconds


RUNTIMES = ("torch", "onnxruntime")


def bench(data_dirs=None, models=("padim", "patchcore"), options=None, runtimes=("torch",), **overrides):
    """Fit every model on every category's train/good and evaluate it on test/, with
    RunOptions as fit() takes them (settings may target one model: model_settings), in
    each of `runtimes`: torch scores the fitted model, onnxruntime its export (checked
    for parity first). Returns a list of result dicts: metrics, fit seconds, score
    ms/image, peak memory, and where the time went (seconds per stage; detector work =
    all but building the backbone, feature extraction and waiting for images)."""
    o = dataclasses.replace(options or RunOptions(), **overrides)
    check_settings(models, o.settings)
    if not runtimes or not set(runtimes) <= set(RUNTIMES):
        raise VadError(f"--runtime {','.join(runtimes)}: choose from {', '.join(RUNTIMES)}")
    for module in ("onnx", "onnxruntime") if "onnxruntime" in runtimes else ():
        optional_import(module)
    where = machine()
    cores = where["cores"] or 1
    where["load_before"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if where["load_before"] and where["load_before"] > cores:
        warn(f"the load average is {where['load_before']:.1f} on {cores} cores before bench starts: "
             f"other work is running, and the timings will be slower than this machine can do")
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    results = []
    with stage_timing():
        for root in data_dirs or synthetic_data():
            dataset = read_dataset(root)
            for model in models:
                with PeakMemory() as fitting:
                    STAGE_SECONDS.clear()
                    start = time.perf_counter()
                    detector = fit(dataset.train, model, o, settings=model_settings(model, o.settings))
                    fit_seconds = time.perf_counter() - start
                    fit_stages = dict(STAGE_SECONDS)
                    STAGE_SECONDS.clear()
                for runtime in runtimes:
                    with PeakMemory() as memory:
                        STAGE_SECONDS.clear()
                        scorer, export_seconds = detector, None
                        if runtime == "onnxruntime":
                            start = time.perf_counter()
                            scorer = OnnxModel(export(detector, batch_size=o.batch_size))
                            export_seconds = time.perf_counter() - start
                            STAGE_SECONDS.clear()
                        metrics = evaluate(scorer, dataset, o.batch_size)
                        score_stages = dict(STAGE_SECONDS)
                    score_seconds = metrics["score_ms_per_image"] * len(dataset.test) / 1000
                    results.append({"category": dataset.name, "model": model, "runtime": runtime,
                                    "backbone": getattr(detector.config, "backbone", "-"), "weights": str(o.weights),
                                    "image_size": o.image_size, "resize": o.resize, "tile": o.tile,
                                    "dtype": detector.precision,
                                    "train_images": min(len(dataset.train), o.max_train or len(dataset.train)),
                                    "test_images": len(dataset.test), **metrics,
                                    "fit_seconds": fit_seconds, "fit_stages": fit_stages,
                                    "export_seconds": export_seconds,
                                    "fit_detector_pct": _share(fit_stages, fit_seconds, "backbone", "features", "load"),
                                    "images_per_second": 1000 / metrics["score_ms_per_image"],
                                    "score_stages": score_stages,
                                    # one graph in ONNX Runtime: its feature extraction is not timed apart
                                    "score_detector_pct": _share(score_stages, score_seconds, "features", "load")
                                    if runtime == "torch" else None,
                                    "peak_mb": max(fitting.peak, memory.peak) / 2**20})
                    note(f"{dataset.name} {model} ({runtime}): image AUROC {metrics['image_auroc']:.4f}, pixel AUROC "
                         f"{metrics['pixel_auroc']:.4f}; fit {fit_seconds:.1f}s (" +
                         ", ".join(f"{k} {v:.1f}s" for k, v in sorted(fit_stages.items())) + "); score " +
                         ", ".join(f"{k} {v:.1f}s" for k, v in sorted(score_stages.items())))
    # Others' CPU time while bench ran, not the load average after it, which counts bench's own threads.
    cpu_end, wall = cpu_seconds(), time.perf_counter() - wall_start
    where["others_cpu_share"] = None if cpu_start is None or cpu_end is None else \
        max(0.0, (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1])) / (wall * cores)
    if where["others_cpu_share"] and where["others_cpu_share"] > 0.1:
        warn(f"other processes used {where['others_cpu_share']:.0%} of the {cores} cores while bench ran: "
             f"the timings are slower than this machine can do")
    for r in results:
        r["machine"] = where
    return results


BENCH_COLUMNS = [  # (key, header, format)
    ("category", "category", "{}"), ("model", "model", "{}"), ("runtime", "runtime", "{}"),
    ("backbone", "backbone", "{}"),
    ("image_auroc", "image AUROC", "{:.4f}"), ("pixel_auroc", "pixel AUROC", "{:.4f}"),
    ("aupro", "AUPRO@30%", "{:.4f}"), ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
    ("f1", "F1", "{:.3f}"), ("accuracy", "accuracy", "{:.3f}"), ("f1_max_oracle", "F1-max (oracle)", "{:.3f}"),
    ("fit_seconds", "fit s", "{:.1f}"), ("fit_detector_pct", "fit: detector %", "{:.0f}"),
    ("score_ms_per_image", "score ms/img", "{:.1f}"), ("images_per_second", "img/s", "{:.2f}"),
    ("score_detector_pct", "score: detector %", "{:.0f}"), ("peak_mb", "peak MB", "{:.0f}"),
]


def bench_table(results):
    """A markdown table, one row per category and model."""
    lines = ["| " + " | ".join(h for _, h, _ in BENCH_COLUMNS) + " |",
             "|" + "|".join("---" for _ in BENCH_COLUMNS) + "|"]
    for r in results:
        lines.append("| " + " | ".join("-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in BENCH_COLUMNS)
                     + " |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Heat maps, defect masks and regions

MAX_OVERLAY_SIDE = 2048  # a heat map's long side: larger images are drawn scaled down (memory, not looks)
_COLORS = np.array([[0, 0, 128], [0, 64, 255], [0, 224, 255], [255, 224, 0], [255, 32, 0]], dtype=np.float64)


def colorize(t):
    """Values in [0, 1] (H, W) -> RGB (H, W, 3) on a blue-cyan-yellow-red scale."""
    x = np.clip(t, 0, 1) * (len(_COLORS) - 1)
    i = np.minimum(x.astype(int), len(_COLORS) - 2)
    f = (x - i)[..., None]
    return _COLORS[i] * (1 - f) + _COLORS[i + 1] * f


def overlay(image, anomaly_map, low, pixel_threshold, outline="pixel_threshold"):
    """The image (3, H, W) in [0, 1] with its map blended in and the region above
    `outline` (default: pixel_threshold; None: no outline) outlined in white -> uint8
    (H, W, 3). Colour is 0 at the typical normal value `low` and half-way at the pixel
    threshold; pixels not inspected (NaN) stay as they are."""
    rgb = image.permute(1, 2, 0).numpy() * 255
    inspected = np.isfinite(anomaly_map)[..., None]
    t = (anomaly_map - low) / max(2 * (pixel_threshold - low), 1e-12)
    out = np.where(inspected, 0.55 * rgb + 0.45 * colorize(np.nan_to_num(t)), rgb)
    import scipy.ndimage  # only heat maps need it

    region = defect_mask(anomaly_map, pixel_threshold if outline == "pixel_threshold" else outline)
    edge = region & ~scipy.ndimage.binary_erosion(region, iterations=2)
    out[edge] = 255
    return out.astype(np.uint8)


def heatmap_png(detector, source, anomaly_map, outline="pixel_threshold"):
    """The PNG file bytes of an image (path or bytes) with its map overlaid, on the
    colour scale of the detector's normal maps, its regions above `outline` outlined
    (region_level). The map is at the image's own size (map_to_source), or at that size
    scaled down with fit_within: the image is then drawn at the map's size."""
    image = read_source(source, max_side=max(anomaly_map.shape))
    rgb = overlay(image, anomaly_map, float(detector.map_low), float(detector.pixel_threshold), outline)
    return _png(Image.fromarray(rgb))


PNG_MARK = b"tEXtSoftware\x00vad"  # in every PNG vad writes, so that a rerun knows its own outputs


def _png(image):
    buffer = io.BytesIO()
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "vad")
    image.save(buffer, format="PNG", pnginfo=text)
    return buffer.getvalue()


def is_vad_output(path):
    """Whether an existing file at one of score's output names is one vad wrote there: a
    PNG marked by _png (heat maps, masks), or a .npy (maps). Others are never replaced."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x93NUMPY") if Path(path).suffix == ".npy" else \
        head.startswith(b"\x89PNG\r\n\x1a\n") and PNG_MARK in head


def region_level(anomaly_map, anomalous, pixel_threshold, low):
    """The level above which an image's map is outlined as defect regions: the one rule
    that makes verdict and regions agree for every detector (issue 21), whose image
    score need not be its map's maximum (PatchCore's eq. 7, top-k means, a changed image
    threshold). An ok image has no region: None. An anomalous image is outlined above
    the pixel threshold, or, where its whole map stays under it, above the half-way
    point between the typical normal value `low` and its peak (a half-maximum contour),
    so that it has at least one region."""
    if not anomalous:
        return None
    finite = anomaly_map[np.isfinite(anomaly_map)]
    if not finite.size or finite.max() > pixel_threshold:
        return pixel_threshold
    peak = finite.max()
    level = (low + float(peak)) / 2
    # compared in the map's own dtype (NumPy 2 casts a Python float to it): below the peak there
    return level if finite.dtype.type(level) < peak else float(np.nextafter(peak, finite.dtype.type(-np.inf)))


def defect_mask(anomaly_map, pixel_threshold):
    """Where the map is above the pixel threshold (NaN, not inspected, never is; None:
    nowhere): bool (H, W)."""
    if pixel_threshold is None:
        return np.zeros(anomaly_map.shape, dtype=bool)
    return np.nan_to_num(anomaly_map, nan=-np.inf) > pixel_threshold


def mask_png(anomaly_map, pixel_threshold):
    """The defect mask as a PNG a vision system can read: 255 defect, 0 not."""
    return _png(Image.fromarray(defect_mask(anomaly_map, pixel_threshold).astype(np.uint8) * 255))


MAX_REGIONS = 100  # regions listed per image, largest first; region_count says how many there were


def defect_regions(anomaly_map, pixel_threshold, scale=(1.0, 1.0), limit=MAX_REGIONS):
    """The defects of a map, for a PLC or a database rather than a person: connected
    regions (8-connected, so a diagonal crack is one) of the pixels above the pixel
    threshold -> (up to `limit` dicts, largest area first, and how many there were).
    Each: box [x0, y0, x1, y1] (x1, y1 exclusive), area in pixels, peak map value and
    centroid [x, y]. scale = (sy, sx) maps the map's pixels to the image's, for a map
    computed at a reduced size (serve); coordinates are then rounded to whole pixels."""
    import scipy.ndimage  # only regions need it

    region = defect_mask(anomaly_map, pixel_threshold)
    labels, n = scipy.ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
    if not n:
        return [], 0
    index = np.arange(1, n + 1)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = scipy.ndimage.maximum(anomaly_map, labels, index)
    centres = scipy.ndimage.center_of_mass(region, labels, index)
    boxes = scipy.ndimage.find_objects(labels)
    (sy, sx), regions = scale, []
    for i in sorted(range(n), key=lambda i: (-areas[i], -peaks[i], boxes[i][0].start, boxes[i][1].start))[:limit]:
        rows, cols = boxes[i]
        regions.append({"box": [round(cols.start * sx), round(rows.start * sy), round(cols.stop * sx),
                                round(rows.stop * sy)],
                        "area": int(round(areas[i] * sx * sy)), "peak": float(peaks[i]),
                        "centroid": [round(float(centres[i][1] + 0.5) * sx - 0.5, 2),
                                     round(float(centres[i][0] + 0.5) * sy - 0.5, 2)]})
    return regions, n

# -----------------------------------------------------------------------------
# Serving: the report's upload-and-inspect page (ch. 6) and a JSON endpoint, standard library only
#
# One I/O thread holds every connection and reads it without blocking (selectors), so a
# slow or silent client costs a socket and a few kilobytes, never a thread. It answers
# the page, /health, /models, /metrics and every error itself, and hands each complete /score
# request to a small pool of workers: decoding, scoring and drawing then run at most
# SERVE_WORKERS at a time, which is what bounds the server's memory. Requests wait for a
# worker in the I/O thread's own queue, bounded by count, bytes and pixels, and leave it
# as soon as their client goes (issue 24: abandoned uploads kept the workers busy for
# minutes). Every stage of a request has a total deadline, so a client that sends a
# byte every few seconds is cut off as surely as a silent one.

MAX_UPLOAD_BYTES = 20 * 2**20  # per request; larger bodies get 413
HEADER_SECONDS = 10.0  # for a request line and headers, from their first byte (a new connection: from the connect)
BODY_SECONDS = 60.0  # for a body, from the end of its headers (20 MiB at about 3 Mbit/s)
IDLE_SECONDS = 5.0  # a kept-alive connection's wait for its next request
SEND_SECONDS = 30.0  # for a client to take in its answer
MAX_CONNECTIONS = 4096  # open at once (fewer under a low open-file limit); beyond, the oldest unfinished one goes
MAX_REQUEST_LINE = 8 * 2**10  # longer gets 414
MAX_HEADER_BYTES = 32 * 2**10  # request line and headers together; more, or over MAX_HEADERS lines, gets 431
MAX_HEADERS = 100
MAX_PARTS = 100  # multipart form parts looked through for the image
MAX_PART_HEADER_BYTES = 8 * 2**10
SERVE_WORKERS = 2  # requests decoded, scored and drawn at once; inference itself is one at a time
MAX_WAITING = 64  # complete requests queued for a worker; more get 503
# The pixels of the uploads with a worker or queued for one, read from their headers
# before they queue: what a queue costs is decoding (and drawing), which grows with the
# pixels, and 64 requests of 25 Mpx each kept two workers busy for 91 s (issue 24). Two
# of the largest images vad reads, or 8 of 25 Mpx: seconds of work, not minutes. More
# get 503, except on an idle server, which takes any image vad can read.
MAX_QUEUED_PIXELS = 2 * MAX_PIXELS
BODY_BUDGET_BYTES = 256 * 2**20  # bodies held at once, arriving or queued (at least one --max-bytes body); more get 503
LOG_SECONDS = 10.0  # dropped connections are logged as one summary line per interval
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vad: inspect an image</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 900px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; }
#drop { display: block; margin-top: 1rem; border: 2px dashed #999; border-radius: 8px; padding: 2rem;
        text-align: center; cursor: pointer; }
#drop.over { background: #eef3ff; border-color: #36c; }
#result { display: flex; gap: 2rem; margin-top: 1.5rem; align-items: flex-start; flex-wrap: wrap; }
#overlay { width: 384px; max-width: 100%; border: 1px solid #ccc; }
td { padding: .2rem .8rem .2rem 0; }
.ok { color: #17702f; font-weight: bold; } .anomalous { color: #b00020; font-weight: bold; }
#error { color: #b00020; } #info { color: #666; }
</style></head><body>
<h1>vad: inspect an image</h1>
<p><label>Model <select id="model"></select></label> <span id="info"></span></p>
<label id="drop">Drop an image here, or click to choose a file
<input id="file" type="file" accept="image/*" hidden></label>
<p id="error"></p>
<div id="result" hidden>
<img id="overlay" alt="the image with its anomaly map; the predicted defect outlined in white">
<table>
<tr><td>image</td><td id="name"></td></tr>
<tr><td>score</td><td id="score"></td></tr>
<tr><td>threshold</td><td id="threshold"></td></tr>
<tr><td>verdict</td><td id="verdict"></td></tr>
</table></div>
<script>
const $ = id => document.getElementById(id);
let models = [];
function showInfo() {
  const m = models.find(m => m.name === $("model").value);
  $("info").textContent = m ? `${m.detector}, ${m.backbone}, ${m.image_size} px` : "";
}
fetch("/models").then(r => r.json()).then(list => {
  models = list;
  for (const m of list) $("model").append(new Option(m.name, m.name));
  showInfo();
});
$("model").onchange = showInfo;
async function inspect(file) {
  $("error").textContent = "";
  const url = "/score?overlay=1&model=" + encodeURIComponent($("model").value);
  try {
    const r = await fetch(url, {method: "POST", body: file});
    const j = await r.json();
    if (!r.ok) throw new Error(j.error);
    $("overlay").src = j.overlay;
    $("name").textContent = file.name;
    $("score").textContent = j.score.toFixed(4);
    $("threshold").textContent = j.threshold.toFixed(4);
    $("verdict").textContent = j.verdict;
    $("verdict").className = j.verdict;
    $("result").hidden = false;
  } catch (e) {
    $("error").textContent = e.message;
    $("result").hidden = true;
  }
}
$("file").onchange = e => e.target.files[0] && inspect(e.target.files[0]);
const drop = $("drop");
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) inspect(e.dataTransfer.files[0]);
};
</script></body></html>
"""


def _inline_source(page, tag):
    """The CSP source that allows the page's one inline <tag> block and nothing else:
    its SHA-256 (CSP Level 2), so no injected script can run."""
    block = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


PAGE_CSP = (f"default-src 'none'; script-src {_inline_source(PAGE, 'script')}; "
            f"style-src {_inline_source(PAGE, 'style')}; img-src data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
JSON_CSP = "default-src 'none'; frame-ancestors 'none'"


def describe(name, detector):
    f = detector.framing
    return {"name": name, "detector": detector.name, "backbone": getattr(detector.config, "backbone", "-"),
            "image_size": "x".join(map(str, f.size)) if f.size else "native", "resize": f.resize, "tile": f.tile,
            "threshold": float(detector.threshold), "pixel_threshold": float(detector.pixel_threshold)}


class ClientGone(Exception):
    """The client of a queued or running /score request has closed or reset its
    connection: the work it asked for is dropped, as nobody would read the answer."""


def client_gone(sock):
    """Whether a connection's client has gone (closed its side, or reset it), seen
    without taking a byte: an EOF or an error on a peek. A client that shuts down its
    sending side and still waits for the answer reads as gone, as nginx treats one (its 499)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):  # nothing to read: still there
        return False
    except OSError:  # reset, or closed by the server itself
        return True


def upload_pixels(data):
    """The pixels an uploaded image decodes to, from its header alone (Pillow decodes no
    pixel on open): 0 for bytes that are no image and for an image over MAX_PIXELS,
    which are refused before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0
    return w * h if w * h <= MAX_PIXELS else 0


class HttpError(Exception):
    """An answer other than 200: the status, the message of its JSON body, extra headers;
    close: the connection cannot carry another request after it."""

    def __init__(self, status, message, headers=None, close=False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


def public_message(message):
    """An error message with object reprs (`<_io.BytesIO object at 0x...>`, which
    Pillow puts in some) taken out: they say nothing to a client about its upload."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", message)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: methods, header names, parameters
_PARAMETER = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def header_parameters(value):
    """The parameters of a header such as `form-data; name="image"; filename="a.png"`
    -> {lower-case name: value}, quotes undone; the first of repeated ones counts."""
    parameters = {}
    for name, v in _PARAMETER.findall(value):
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        parameters.setdefault(name.lower(), v)
    return parameters


def _is_image_part(head):
    """Whether a multipart part, by its headers, is the image: a file, or a field named
    image or file."""
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-disposition":
            p = header_parameters(value)
            return bool(p.get("filename") or p.get("filename*")) or p.get("name") in ("image", "file")
    return False


def multipart_file(body, content_type):
    """The first file (or field named image or file) of a multipart/form-data body, or None.

    One pass from delimiter to delimiter with bytes.find (RFC 7578, RFC 2046 sec. 5.1.1),
    so the time is linear in the body; a generic MIME parser builds an object per part
    and takes minutes over a body of tiny ones. At most MAX_PARTS parts and
    MAX_PART_HEADER_BYTES of headers per part are looked at."""
    boundary = header_parameters(content_type).get("boundary", "")
    if not 1 <= len(boundary) <= 70:  # RFC 2046's limit
        raise HttpError(400, "multipart form without a boundary of 1 to 70 characters")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        return None
    at = start + len(delimiter)
    for _ in range(MAX_PARTS):
        if body.startswith(b"--", at):  # the closing delimiter
            return None
        line_end = body.find(b"\r\n", at, at + 256)  # after a delimiter: optional padding, then CRLF
        head_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEADER_BYTES) if line_end >= 0 else -1
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            raise HttpError(400, f"malformed multipart form (or a part's headers over {MAX_PART_HEADER_BYTES} bytes)")
        if _is_image_part(body[line_end + 2: head_end]):
            return body[head_end + 4: end]
        at = end + 2 + len(delimiter)
    raise HttpError(400, f"no file among the first {MAX_PARTS} parts of the multipart form")


@dataclass
class Request:
    """A request's line and headers as read, and, once it has arrived, its body."""
    method: str
    target: str
    version: str
    headers: list  # (lower-case name, value), in order: a repeated header must be seen as repeated
    body: bytes = b""
    started: float = field(default_factory=time.monotonic)  # when its headers were read (/metrics latency)

    def all(self, name):
        return [v for n, v in self.headers if n == name]

    def header(self, name, default=""):
        values = self.all(name)
        return values[0] if values else default

    @property
    def path(self):
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self):
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query)

    @property
    def keep_alive(self):
        tokens = {t.strip().lower() for v in self.all("connection") for t in v.split(",")}
        return "close" not in tokens and (self.version == "HTTP/1.1" or "keep-alive" in tokens)


def parse_head(head):
    """A request line and its headers (bytes, without the blank line) -> Request.
    Anything a proxy in front might read differently is refused (HttpError): folded or
    malformed header lines, control characters, versions other than HTTP/1.0 and 1.1."""
    lines = head.split(b"\r\n")
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise HttpError(414, f"request line over {MAX_REQUEST_LINE} bytes", close=True)
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"over {MAX_HEADERS} header lines", close=True)
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1].startswith("/") \
            or any(ord(c) < 0x21 or ord(c) == 0x7f for c in parts[1]):
        raise HttpError(400, "malformed request line", close=True)
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505 if version.startswith("HTTP/") else 400, f"{version[:20]!r}: vad speaks HTTP/1.1",
                        close=True)
    headers = []
    for line in lines[1:]:
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
            raise HttpError(400, "malformed header line", close=True)
        headers.append((name.lower(), value.strip(" \t")))
    return Request(method, target, version, headers)


def body_length(request):
    """The body's declared length, or None without one. Ambiguous framing, which a
    proxy and this server could each read their own way (request smuggling), is refused:
    two Content-Lengths, Transfer-Encoding beside one, anything but ASCII digits."""
    lengths, codings = request.all("content-length"), request.all("transfer-encoding")
    if codings and lengths:
        raise HttpError(400, "Transfer-Encoding and Content-Length together: send one Content-Length", close=True)
    if codings:
        raise HttpError(411, "chunked uploads are not supported: send the image with a Content-Length header",
                        close=True)
    if len(lengths) > 1:
        raise HttpError(400, "more than one Content-Length header", close=True)
    if not lengths:
        return None
    if not (lengths[0].isascii() and lengths[0].isdigit()):
        raise HttpError(400, "Content-Length must be ASCII digits", close=True)
    digits = lengths[0].lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18  # over any limit: 413, as any other too-large body


def host_name(value):
    """A Host header -> the host, lower-case, without port, brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


def is_ip_literal(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    return False


def raise_open_file_limit():
    """Lift this process's soft limit on open files to its hard limit (every connection
    is an open file); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 2**16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # some systems cap the soft limit below the hard one
            pass
    return soft


def _json(obj):
    return json_text(obj).encode()


def _printable(data, limit=200):
    """Bytes from a client as a log-safe line: no control characters, at most `limit` long."""
    text = data[:limit].decode("latin-1")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class Connection:
    """One client connection as the I/O thread sees it.

    state: head (waiting for a request line and headers), body (for the body), busy (a
    worker has the request), send (answering). fresh: no byte of the next request yet.
    drain: bytes of an answered request's body still to be read and dropped, so the
    client, which sends its whole body before it reads, gets to read the answer."""
    __slots__ = ("sock", "address", "state", "deadline", "inbuf", "scanned", "fresh", "served", "request",
                 "line", "length", "reserved", "pixels", "work", "out", "sent", "closing", "drain", "events", "open")

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.state, self.deadline = sock, address, "head", deadline
        self.inbuf, self.scanned, self.fresh, self.served = bytearray(), 0, True, 0
        self.request, self.line, self.length, self.reserved, self.pixels, self.work = None, "-", 0, 0, 0, None
        self.out, self.sent, self.closing, self.drain, self.events, self.open = b"", 0, False, 0, 0, True


# /metrics: Prometheus' text exposition format, version 0.0.4
# (prometheus.io/docs/instrumenting/exposition_formats): per family a "# HELP" and a
# "# TYPE" line, then its samples; counters end in _total; a histogram is cumulative
# _bucket{le=...} samples ending with le="+Inf", then _sum and _count.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # s: the Prometheus
# clients' defaults, with 30 and 60 for bodies near BODY_SECONDS
SCORE_BUCKETS = (-0.75, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 3.0)  # threshold + |threshold| x these:
# scores of every detector on one scale, and le=threshold counts the ok verdicts
ROUTES = ("/", "/health", "/models", "/metrics", "/score", "/favicon.ico")  # any other path is counted as "other"


def metric_number(x):
    """A sample value or le bound as the format writes it (Go's ParseFloat reads it)."""
    if isinstance(x, int):
        return str(x)
    return "+Inf" if x == math.inf else "-Inf" if x == -math.inf else repr(float(x))


def metric_labels(labels):
    """{name: value} -> '{name="value",...}', with backslash, double quote and newline
    escaped as the format asks."""
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


class Histogram:
    """Counts of observations at or below each bound (cumulative when written), their sum."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts, self.sum = [0] * (len(self.bounds) + 1), 0.0

    def observe(self, value):
        if math.isfinite(value):  # a NaN score (a verdict fails closed on it) has no bucket, and no sum
            self.counts[int(np.searchsorted(self.bounds, value, side="left"))] += 1  # value <= bounds[i]
            self.sum += value

    def samples(self, name, labels):
        cumulative = itertools.accumulate(self.counts)
        lines = [f"{name}_bucket{metric_labels(labels | {'le': metric_number(le)})} {n}"
                 for le, n in zip((*self.bounds, math.inf), cumulative)]
        return lines + [f"{name}_sum{metric_labels(labels)} {metric_number(self.sum)}",
                        f"{name}_count{metric_labels(labels)} {sum(self.counts)}"]


class ServerMetrics:
    """What serve counts for /metrics and /health: requests answered by route and
    status, their latency, and per model the verdicts, scores, time spent scoring and the
    drift window (DriftMonitor, the last DRIFT_WINDOW verdicts). The I/O thread and the
    workers both record, so one lock guards it all. Its size is bounded: a fixed set of
    routes and statuses, and a fixed set of series per model."""

    def __init__(self, models):
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # (route, status) -> answers
        self.latency = {route: Histogram(LATENCY_BUCKETS) for route in (*ROUTES, "other")}
        self.monitors = {name: DriftMonitor(d, DRIFT_WINDOW) for name, d in models.items()}
        self.scores, self.inference = {}, {}
        for name, d in models.items():
            t = float(d.threshold)
            self.scores[name] = Histogram(t + abs(t or 1.0) * f for f in SCORE_BUCKETS)
            self.inference[name] = Histogram(LATENCY_BUCKETS)

    def answered(self, request, status):
        """An answer sent to a request (None: its request line could not be read)."""
        route = request.path if request is not None and request.path in ROUTES else "other"
        with self.lock:
            self.requests[route, status] += 1
            if request is not None:
                self.latency[route].observe(time.monotonic() - request.started)

    def scored(self, name, result, seconds):
        """A model's Scored for an upload, and the seconds its worker spent on it."""
        with self.lock:
            self.monitors[name].add(result)
            self.inference[name].observe(seconds)
            if not result.error:
                self.scores[name].observe(result.score)

    def drifting(self):
        """The names of the models whose window has drifted."""
        with self.lock:
            return [name for name, m in self.monitors.items() if m.drift]

    def render(self):
        """The text page of /metrics."""
        out = []

        def family(name, kind, text, samples):
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples])
        with self.lock:
            family("vad_requests_total", "counter", "HTTP requests answered, by route (other: any other path) and "
                   "status; connections cut off before an answer are in the log instead.",
                   [f"vad_requests_total{metric_labels({'route': r, 'status': s})} {n}"
                    for (r, s), n in sorted(self.requests.items())])
            family("vad_request_duration_seconds", "histogram", "From a request's headers to its answer, by route.",
                   [line for route, h in self.latency.items() for line in
                    h.samples("vad_request_duration_seconds", {"route": route})])
            family("vad_inference_seconds", "histogram", "Time a worker spent on an upload (waiting for the model, "
                   "scoring, drawing), by model.",
                   [line for name, h in self.inference.items() for line in
                    h.samples("vad_inference_seconds", {"model": name})])
            family("vad_verdicts_total", "counter", "Uploads judged, by model and verdict (error: not a readable "
                   "image).", [f"vad_verdicts_total{metric_labels({'model': name, 'verdict': v})} {n}"
                               for name, m in self.monitors.items() for v, n in
                               (("ok", m.scored - m.anomalous), ("anomalous", m.anomalous), ("error", m.errors))])
            family("vad_score", "histogram", "Image scores, by model; bounds are the model's threshold plus "
                   f"{', '.join(map(str, SCORE_BUCKETS))} times its absolute value.",
                   [line for name, h in self.scores.items() for line in h.samples("vad_score", {"model": name})])
            checked = {name: m for name, m in self.monitors.items() if m.reference is not None}
            for metric, kind, text, value in [
                ("vad_drift_window_verdicts", "gauge", f"Verdicts in the drift window (the last {DRIFT_WINDOW}).",
                 lambda m: m.in_window),
                ("vad_drift_window_good", "gauge", "Good verdicts in the drift window.", lambda m: m.good),
                ("vad_drift_window_above", "gauge", f"Scores in the drift window above the held-out "
                 f"{DRIFT_PERCENTILE}th percentile.", lambda m: m.above),
                ("vad_drift_window_good_above", "gauge", f"Good-verdict scores in the drift window above the "
                 f"held-out {DRIFT_PERCENTILE}th percentile.", lambda m: m.good_above),
                ("vad_drift_reference_score", "gauge", f"The held-out {DRIFT_PERCENTILE}th percentile.",
                 lambda m: m.reference.score),
                ("vad_drift_expected_ratio", "gauge", "The share of scores expected above it while nothing "
                 "changes.", lambda m: m.reference.expected),
                ("vad_drift_p_value", "gauge", "Beta-binomial tail probability of the window's count above it.",
                 lambda m: m.p_value),
                ("vad_drift", "gauge", f"1 when the window has drifted (p < {DRIFT_P}), else 0; models without "
                 f"held-out scores (exports) have no drift series.", lambda m: int(m.drift))]:
                family(metric, kind, text, [f"{metric}{metric_labels({'model': name})} {metric_number(value(m))}"
                                            for name, m in checked.items()])
        return ("\n".join(out) + "\n").encode()


class InspectionServer:
    """The HTTP server holding the loaded models (see the section's opening comment).
    Inference is serialized by one lock: torch already spreads one forward pass over
    every core. serve_forever, shutdown, server_close and server_address work as in
    socketserver; the deadlines are attributes that tests may shorten."""

    def __init__(self, models, address=("127.0.0.1", 8000), max_bytes=MAX_UPLOAD_BYTES, quiet=False,
                 batch_size=BATCH_SIZE, allow_hosts=(), workers=SERVE_WORKERS, max_connections=MAX_CONNECTIONS,
                 max_queued_pixels=MAX_QUEUED_PIXELS):
        self.models, self.max_bytes, self.quiet, self.batch_size = dict(models), max_bytes, quiet, batch_size
        self.lock = threading.Lock()
        self.header_seconds, self.body_seconds = HEADER_SECONDS, BODY_SECONDS
        self.idle_seconds, self.send_seconds = IDLE_SECONDS, SEND_SECONDS
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.create_server(address, family=family, backlog=1024)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.hosts = ({"localhost", host_name(address[0])} | {host_name(h) for h in allow_hosts}) - {""}
        files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        files = 2**20 if files == resource.RLIM_INFINITY else files
        self.max_connections = max(1, min(max_connections, files - 64))  # leave files for models, logs, pipes
        self.max_pending = workers + MAX_WAITING
        self.body_budget = max(BODY_BUDGET_BYTES, max_bytes)
        self.max_queued_pixels = max_queued_pixels
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="vad-serve")
        self.selector = selectors.DefaultSelector()
        self.wake_in, self.wake_out = socket.socketpair()
        self.wake_in.setblocking(False)
        self.wake_out.setblocking(False)
        self.connections = {}  # Connection -> None: an ordered set, oldest first
        self.finished = collections.deque()  # (Connection, status, body) from the workers
        self.pending = self.reserved = 0  # requests with a worker or queued; their declared body bytes
        self.queued_pixels = 0  # the pixels of the pending requests' images (upload_pixels)
        # Requests wait here, not in the pool's own queue, so that one whose client goes
        # is taken out at once, its bytes and its place freed (_check_gone).
        self.waiting, self.running, self.workers = collections.deque(), 0, workers
        self.dropped = collections.Counter()  # why -> connections dropped since the last summary line
        self.last_summary = time.monotonic()
        self.stopping, self.stopped = False, threading.Event()
        self.stopped.set()
        self.metrics = ServerMetrics(self.models)

    # -- the model work, on a worker --------------------------------------------------

    def inspect(self, name, data, with_overlay=False, gone=lambda: False):
        """Score image bytes with model `name` -> the JSON-ready result. The overlay is
        drawn at most MAX_OVERLAY_SIDE on its long side, its map computed at that size.
        gone() is asked before each costly stage (decoding and scoring, drawing): when
        it says the client has left, ClientGone is raised and the rest is not done."""
        detector, start = self.models[name], time.monotonic()
        with self.lock:  # the wait for it can be long: ask after it
            if gone():
                raise ClientGone
            r = next(score_files(detector, [data], self.batch_size, desc=None))
        self.metrics.scored(name, r, time.monotonic() - start)
        if r.error:
            raise VadError(r.error)
        # Regions are found on the map at the overlay's bounded size and given in the
        # image's own pixels: exact up to MAX_OVERLAY_SIDE, and memory stays bounded above it.
        size = fit_within(r.source_size, MAX_OVERLAY_SIDE)
        anomaly_map = map_to_source(r.anomaly_map, r.source_size, detector.framing, size)
        pixel_threshold = float(detector.pixel_threshold)
        level = region_level(anomaly_map, r.verdict == "anomalous", pixel_threshold, float(detector.map_low))
        regions, count = defect_regions(anomaly_map, level, (r.source_size[0] / size[0], r.source_size[1] / size[1]))
        result = {"model": name, "score": r.score, "threshold": r.threshold, "verdict": r.verdict,
                  "margin": r.score - r.threshold, "pixel_threshold": pixel_threshold, "region_threshold": level,
                  "regions": regions, "region_count": count}
        if with_overlay:
            if gone():  # drawing decodes the image again
                raise ClientGone
            png = heatmap_png(detector, data, anomaly_map, level)
            result["overlay"] = "data:image/png;base64," + base64.b64encode(png).decode()
        return result

    def _work(self, conn, name, data):
        """A queued /score request and its image bytes -> (status, JSON body), or
        (None, b"") when its client has gone. Never raises: a bug answers 500 and
        leaves one line in the log."""
        request = conn.request
        try:
            gone = functools.partial(client_gone, conn.sock)
            if gone():  # it waited in the queue: is anyone still there?
                raise ClientGone
            with_overlay = request.query.get("overlay", ["0"])[0].lower() in ("1", "true", "yes")
            return 200, _json(self.inspect(name, data, with_overlay, gone))
        except ClientGone:
            return None, b""
        except HttpError as e:
            return e.status, _json({"error": e.message})
        except VadError as e:
            return 400, _json({"error": public_message(str(e))})
        except Exception as e:  # a bug (or MemoryError) must not take the server down: answer and go on
            self.log(f"internal error on {request.method} {_printable(request.target.encode('latin-1'))}: "
                     f"{type(e).__name__}: {e}")
            return 500, _json({"error": f"internal error ({type(e).__name__}); the server's log has the details"})

    # -- the I/O thread ---------------------------------------------------------------

    def serve_forever(self, poll_interval=0.25):
        """Run the I/O thread's loop until shutdown(); deadlines are checked every
        poll_interval seconds."""
        self.stopping = False
        self.stopped.clear()
        self.selector.register(self.socket, selectors.EVENT_READ, self._accept)
        self.selector.register(self.wake_out, selectors.EVENT_READ, self._collect)
        try:
            next_sweep = 0.0
            while not self.stopping:
                for key, events in self.selector.select(poll_interval):
                    if isinstance(key.data, Connection):
                        self._serve(key.data, events)
                    else:
                        key.data()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + poll_interval
        finally:
            self.selector.unregister(self.socket)
            self.selector.unregister(self.wake_out)
            self._summarize(time.monotonic())
            self.stopped.set()

    def shutdown(self):
        """Stop serve_forever (from another thread) and wait until it has returned."""
        self.stopping = True
        self._wake()
        self.stopped.wait()

    def server_close(self):
        for conn in list(self.connections):
            self._close(conn)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for s in (self.socket, self.wake_in, self.wake_out):
            s.close()
        self.selector.close()

    def log(self, line):
        if not self.quiet:
            try:
                print(line, file=sys.stderr, flush=True)
            except (OSError, ValueError):  # stderr gone: serving matters more than the log
                pass

    def _wake(self):
        try:
            self.wake_in.send(b"\0")
        except OSError:  # full: the loop is already due to wake
            pass

    def _watch(self, conn, events):
        """Have the selector report `events` for conn (0: nothing, while a worker has it)."""
        if events == conn.events:
            return
        if not conn.events:
            self.selector.register(conn.sock, events, conn)
        elif not events:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn):
        if not conn.open:
            return
        self._watch(conn, 0)
        conn.sock.close()
        conn.open = False
        self.connections.pop(conn, None)
        if conn.state == "body":
            self._release(conn)

    def _release(self, conn):
        self.reserved -= conn.reserved
        conn.reserved = 0

    def _accept(self):
        for _ in range(64):  # then let the connections already open have their turn
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError:  # out of files: make room for the next one
                self._evict()
                return
            sock.setblocking(False)
            if len(self.connections) >= self.max_connections and not self._evict():
                self.dropped["refused while full"] += 1
                self._try_send(sock, 503, "too many connections: try again in a moment")
                sock.close()
                continue
            conn = Connection(sock, address[0], time.monotonic() + self.header_seconds)
            self.connections[conn] = None
            self._watch(conn, selectors.EVENT_READ)

    def _evict(self):
        """Close the oldest connection whose request is unfinished, to make room; 1 if
        there was one, else 0."""
        victim = next((c for c in self.connections if c.state in ("head", "body")), None)
        if victim is None:
            return 0
        self.dropped[f"dropped for newer ones (over {self.max_connections} open)"] += 1
        self._close(victim)
        return 1

    def _sweep(self, now):
        """Close the connections past their deadline: a request left unfinished is told
        so (408, best effort); a kept-alive connection left idle is simply closed."""
        for conn in [c for c in self.connections if c.deadline <= now]:
            if not (conn.state == "head" and conn.fresh and conn.served):
                self.dropped["timed out"] += 1
                if conn.state in ("head", "body") and not conn.fresh:
                    self._try_send(conn.sock, 408, "request not received in time")
            self._close(conn)
        if now >= self.last_summary + LOG_SECONDS:
            self._summarize(now)

    def _summarize(self, now):
        """One log line for the connections dropped since the last one, not one each: a
        flood of them must not become a flood of log lines."""
        if self.dropped:
            counts = ", ".join(f"{n} {why}" for why, n in self.dropped.items())
            self.log(f"dropped {sum(self.dropped.values())} connection(s) in the last "
                     f"{now - self.last_summary:.0f} s: {counts}")
            self.dropped.clear()
        self.last_summary = now

    @contextlib.contextmanager
    def _guard(self, conn):
        """A bug must cost one connection, not the server: one log line, and it closes."""
        try:
            yield
        except Exception as e:
            self.log(f"internal error on a connection from {conn.address}: {type(e).__name__}: {e}")
            self._close(conn)

    def _serve(self, conn, events):
        with self._guard(conn):
            if events & selectors.EVENT_READ:
                self._read(conn)
            if conn.open and events & selectors.EVENT_WRITE:
                self._send(conn)
                if conn.open and conn.state == "head":
                    self._advance(conn)

    def _read(self, conn):
        if conn.state == "busy":
            return self._check_gone(conn)
        try:
            data = conn.sock.recv(2**18)
        except BlockingIOError:
            return
        except OSError:  # reset by the client
            data = b""
        if not data:  # the client has gone
            if conn.state == "body" or (conn.state == "head" and not conn.fresh):
                self.dropped["closed by the client mid-request"] += 1
            return self._close(conn)
        if conn.state == "send":  # an answered request's body, read only to be dropped
            conn.drain = max(0, conn.drain - len(data))
            if not conn.drain and conn.sent == len(conn.out):
                self._close(conn)
            return
        if conn.fresh:
            conn.fresh, conn.deadline = False, time.monotonic() + self.header_seconds
        conn.inbuf += data
        self._advance(conn)

    def _advance(self, conn):
        """Take as many requests out of conn.inbuf as are complete: pipelined ones one
        after another, while each is answered at once."""
        while conn.open:
            if conn.state == "head":
                while conn.inbuf.startswith(b"\r\n"):  # RFC 9112 sec. 2.2: blank lines before a request
                    del conn.inbuf[:2]
                    conn.scanned = 0
                if len(conn.inbuf) > MAX_REQUEST_LINE and conn.inbuf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0:
                    return self._refuse_head(conn, 414, f"request line over {MAX_REQUEST_LINE} bytes")
                end = conn.inbuf.find(b"\r\n\r\n", max(0, conn.scanned - 3))
                if (end < 0 and len(conn.inbuf) > MAX_HEADER_BYTES) or end > MAX_HEADER_BYTES:
                    return self._refuse_head(conn, 431, f"request headers over {MAX_HEADER_BYTES} bytes")
                if end < 0 and conn.inbuf.find(b"\n\n", max(0, conn.scanned - 1)) >= 0:
                    return self._refuse_head(conn, 400, "end the request line and headers with CRLF")
                if end < 0:
                    conn.scanned = len(conn.inbuf)
                    return
                head = bytes(conn.inbuf[:end])
                del conn.inbuf[:end + 4]
                conn.scanned = 0
                self._begin(conn, head)
            elif conn.state == "body" and len(conn.inbuf) >= conn.length:
                with memoryview(conn.inbuf) as view:  # one copy of a body that may be large
                    conn.request.body = bytes(view[:conn.length])
                del conn.inbuf[:conn.length]
                self._submit(conn)
            else:
                return

    def _begin(self, conn, head):
        """A request's line and headers have arrived: answer now, or wait for its body."""
        conn.line, conn.request = _printable(head.split(b"\r\n", 1)[0]), None
        try:
            conn.request = request = parse_head(head)
            length = body_length(request)
        except HttpError as e:
            return self._refuse(conn, e)
        try:
            self._check_host(request)
            answer = self._route(request, length)
        except HttpError as e:
            answer = e.status, _json({"error": e.message}), "application/json", e.headers, e.close
        if answer is None:  # a /score request: read its body
            conn.state, conn.length, conn.reserved = "body", length, length
            self.reserved += length
            conn.deadline = time.monotonic() + self.body_seconds
            if request.header("expect").lower() == "100-continue" and len(conn.inbuf) < length:
                self._try_send(conn.sock, 100)
            return
        self._skip_body(conn, length or 0)
        self._answer(conn, *answer)

    def _check_host(self, request):
        """Refuse a Host that is not ours (DNS rebinding: a web page whose name was made
        to resolve to this machine, sending its visitor's browser here). Browsers
        always send Host; HTTP/1.1 requires it."""
        hosts = request.all("host")
        if len(hosts) > 1 or (not hosts and request.version == "HTTP/1.1"):
            raise HttpError(400, "send exactly one Host header", close=True)
        host = host_name(hosts[0]) if hosts else ""
        if hosts and host not in self.hosts and not is_ip_literal(host):
            raise HttpError(421, f"host {host[:100]!r} is not served here: use an IP address or localhost, "
                                 f"or start the server with --allow-host {host[:100]}")

    def _route(self, request, length):
        """(status, body, content type, headers, close) of a request answered without
        its body, or None for a /score request to read and queue."""
        path, method = request.path, request.method
        if path in ("/", "/health", "/models", "/metrics", "/favicon.ico"):
            if method not in ("GET", "HEAD"):
                raise HttpError(405, f"{method} {path}: this page answers GET", {"Allow": "GET, HEAD"})
            if path == "/":
                return 200, PAGE.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP}, False
            if path == "/health":
                drift = bool(self.metrics.drifting())
                return 200, _json({"status": "ok", "models": len(self.models), "drift": drift}), "application/json", \
                    {}, False
            if path == "/metrics":
                return 200, self.metrics.render(), METRICS_TYPE, {}, False
            if path == "/models":
                return 200, _json([describe(n, d) for n, d in self.models.items()]), "application/json", {}, False
            return 204, b"", "image/x-icon", {}, False
        if path != "/score":
            raise HttpError(404, f"no page {path}: try /, /models, /health, /metrics or POST /score?model=NAME")
        if method != "POST":
            raise HttpError(405, f"{method} /score: POST image bytes to /score?model=NAME", {"Allow": "POST"})
        if length is None:
            raise HttpError(411, "send the image with a Content-Length header", close=True)
        if length > self.max_bytes:
            raise HttpError(413, f"body over the {self.max_bytes} byte limit", close=True)
        self._model_name(request)
        if self.pending >= self.max_pending or self.reserved + length > self.body_budget:
            raise HttpError(503, "busy: try again in a moment", {"Retry-After": "1"})
        return None

    def _model_name(self, request):
        models = self.models
        name = request.query.get("model", [next(iter(models)) if len(models) == 1 else ""])[0]
        if not name:
            raise HttpError(404, f"{len(models)} models are served: add ?model=NAME, NAME one of {', '.join(models)}")
        if name not in models:
            raise HttpError(404, f"unknown model {name[:100]!r}; models: {', '.join(models)}")
        return name

    def _skip_body(self, conn, length):
        """Pass over the body of a request answered without it: from the buffer if it is
        all there (the connection can go on), else drained from the socket before the
        connection closes (up to 8 bodies' worth: a larger one is cut off)."""
        if length <= len(conn.inbuf):
            del conn.inbuf[:length]
            return
        conn.drain = length - len(conn.inbuf) if length <= 8 * self.max_bytes else 0
        conn.inbuf.clear()
        conn.closing = True

    def _refuse(self, conn, error):
        """Answer a request whose framing cannot be trusted, and close."""
        conn.inbuf.clear()
        self._answer(conn, error.status, _json({"error": error.message}), "application/json", error.headers, True)

    def _refuse_head(self, conn, status, message):
        """Refuse a request line or headers too long to wait for."""
        conn.line, conn.request = _printable(bytes(conn.inbuf[:200]).split(b"\r\n", 1)[0]), None
        self._refuse(conn, HttpError(status, message))

    def _submit(self, conn):
        """Queue a /score request whose body has arrived, or refuse it: a malformed
        form, or (503) its image's pixels over what the queue may hold."""
        request = conn.request
        try:
            name, data = self._model_name(request), request.body
            content_type = request.header("content-type")
            if content_type.lower().startswith("multipart/form-data"):
                data = multipart_file(data, content_type)
                if data is None:
                    raise HttpError(400, "no file in the multipart form")
            request.body, pixels = b"", upload_pixels(data)  # the worker gets data alone
            if self.pending and self.queued_pixels + pixels > self.max_queued_pixels:
                raise HttpError(503, f"busy: the images queued are over {self.max_queued_pixels:,} pixels; "
                                     f"try again in a moment", {"Retry-After": "1"})
        except HttpError as e:
            self._release(conn)
            request.body = b""
            return self._answer(conn, e.status, _json({"error": e.message}), headers=e.headers, close=e.close)
        conn.state, conn.deadline, conn.pixels, conn.work = "busy", math.inf, pixels, (name, data)
        self.pending += 1
        self.queued_pixels += pixels
        self.waiting.append(conn)  # still watched: an EOF or reset takes it out (_check_gone)
        self._dispatch()

    def _dispatch(self):
        """Hand the oldest waiting requests to the workers that are free."""
        while self.waiting and self.running < self.workers:
            conn = self.waiting.popleft()
            (name, data), conn.work = conn.work, None
            self.running += 1
            future = self.pool.submit(self._work, conn, name, data)
            future.add_done_callback(functools.partial(self._finish, conn))

    def _unqueue(self, conn):
        """Take a request that is answered, or whose client has gone, out of the counts."""
        self.pending -= 1
        self.queued_pixels -= conn.pixels
        conn.pixels = 0
        self._release(conn)

    def _check_gone(self, conn):
        """A request's connection has something to read while it waits or runs: its
        client has gone (EOF, reset), and it is dropped, or the next pipelined request
        has come, which waits in the socket until this one is answered."""
        if not client_gone(conn.sock):
            return self._watch(conn, 0)
        self.dropped["closed by the client before the answer"] += 1
        if conn in self.waiting:  # else a worker has it, and stops at its next check
            self.waiting.remove(conn)
            conn.work = None
            self._unqueue(conn)
        self._close(conn)

    def _finish(self, conn, future):
        """On the worker: hand its answer to the I/O thread, which alone touches sockets."""
        if not future.cancelled():  # cancelled: the server is closing
            self.finished.append((conn, *future.result()))
            self._wake()

    def _collect(self):
        """Answer the requests the workers have finished."""
        try:
            while self.wake_out.recv(4096):
                pass
        except OSError:
            pass
        while self.finished:
            conn, status, body = self.finished.popleft()
            self.running -= 1
            self._unqueue(conn)
            if status is None and conn.open:  # its client has gone: the worker dropped the work
                self.dropped["closed by the client before the answer"] += 1
                self._close(conn)
            elif conn.open:
                with self._guard(conn):
                    conn.request.body = b""
                    self._answer(conn, status, body)
                    if conn.open and conn.state == "head":
                        self._advance(conn)
        self._dispatch()

    def _headers(self, status, length, content_type, headers, close, version="HTTP/1.1"):
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", f"Server: vad/{__version__}",
                 f"Date: {email.utils.formatdate(usegmt=True)}"]
        if status != 100:
            lines += [f"Content-Type: {content_type}", "Cache-Control: no-store", "X-Content-Type-Options: nosniff",
                      "X-Frame-Options: DENY"] + ([f"Content-Length: {length}"] if status != 204 else [])
            headers = {"Content-Security-Policy": JSON_CSP, **headers}
            if close:
                headers["Connection"] = "close"
            elif version == "HTTP/1.0":
                headers["Connection"] = "keep-alive"
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _try_send(self, sock, status, message=""):
        """One non-blocking send of a short answer on a connection about to close (or of
        100 Continue): best effort, as the client may be gone or not reading."""
        body = _json({"error": message}) if status != 100 else b""
        try:
            sock.send(self._headers(status, len(body), "application/json", {}, True) + body)
        except OSError:
            pass

    def _answer(self, conn, status, body, content_type="application/json", headers=None, close=False):
        request = conn.request
        conn.closing = close = close or conn.closing or request is None or not request.keep_alive
        head = self._headers(status, len(body), content_type, headers or {}, close,
                             request.version if request else "HTTP/1.1")
        self.metrics.answered(request, status)
        conn.out = head + (b"" if request and request.method == "HEAD" else body)
        conn.state, conn.sent, conn.deadline = "send", 0, time.monotonic() + self.send_seconds
        if not self.quiet:
            self.log(f'{conn.address} - - [{time.strftime("%d/%b/%Y %H:%M:%S")}] "{conn.line}" {status} {len(body)}')
        self._send(conn)

    def _send(self, conn):
        """Write what is left of the answer; when it is all out, close, or wait for the
        connection's next request."""
        try:
            while conn.sent < len(conn.out):
                conn.sent += conn.sock.send(memoryview(conn.out)[conn.sent:])
        except BlockingIOError:
            return self._watch(conn, selectors.EVENT_WRITE | (selectors.EVENT_READ if conn.drain else 0))
        except OSError:  # the client has gone
            return self._close(conn)
        if conn.drain:
            conn.deadline = time.monotonic() + self.body_seconds
            return self._watch(conn, selectors.EVENT_READ)
        if conn.closing:
            return self._close(conn)
        conn.state, conn.request, conn.out, conn.served = "head", None, b"", conn.served + 1
        conn.fresh = not conn.inbuf
        conn.deadline = time.monotonic() + (self.idle_seconds if conn.fresh else self.header_seconds)
        self._watch(conn, selectors.EVENT_READ)

# -----------------------------------------------------------------------------
# CLI


class CliError(click.ClickException):
    """A one-line error, exit 2; control and format characters of the message (a crafted
    name or file's strings) shown as \\xHH, so that none reaches the terminal raw."""
    exit_code = 2

    def __init__(self, message):
        super().__init__(printable(message))


def printable(text):
    """text with every control, format or unassigned character (ESC, BEL, NUL, a
    right-to-left override) written \\xHH or \\uHHHH."""
    return "".join(c if c.isprintable() or c == " " else
                   (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in text)


class FiniteRange(click.FloatRange):
    """A float option in a range that also refuses nan and inf (click's FloatRange lets
    nan through: every comparison with it is False)."""
    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def lock_models(*paths):
    """model_lock on each model file that this command reads or replaces, until the
    command ends: two commands never change one file at once, whether it is one's
    MODEL_FILE and the other's --out, or both's."""
    ctx, held = click.get_current_context(), set()
    for path in paths:
        if path.resolve() not in held:
            held.add(path.resolve())
            run_api(ctx.with_resource, model_lock(path))


@contextlib.contextmanager
def model_lock(path):
    """Hold an exclusive lock on a model file while a command reads, changes and writes
    it back (fit --update, calibrate): a second such command on the file is refused with
    one line, where both would succeed and the first one's change be lost (issue 24).
    The lock is flock(2) on the file itself, opened read-only: the kernel drops it when
    the process ends however it ends, so no stale lock file is ever left behind."""
    for _ in range(8):  # a writer may rename a new file over the one just opened: lock that one
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # missing or unreadable: load() says so
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now, held = os.stat(path), os.fstat(fd)
        except BlockingIOError:
            os.close(fd)
            raise VadError(f"{path} is being changed by another vad command (fit, fit --update or calibrate); "
                           f"run this one when it has finished") from None
        except OSError:  # gone since it was opened: load() says so
            os.close(fd)
            yield
            return
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            try:
                yield
            finally:
                os.close(fd)
            return
        os.close(fd)
    raise VadError(f"{path} keeps being replaced while vad tries to lock it; try again")


def run_api(fn, *args, **kwargs):
    """Call an API function, turning user errors into one-line CLI errors (exit 2)."""
    try:
        return fn(*args, **kwargs)
    except VadError as e:
        raise CliError(str(e)) from None


def one_line_errors(results):
    """Yield from an API generator, a VadError raised on the way (an exported model
    that fails to run) ending it as a one-line CLI error."""
    try:
        yield from results
    except VadError as e:
        raise CliError(str(e)) from None


def _decorate(f, options):
    for option in reversed(options):
        f = option(f)
    return f


def setting_text(value):
    """A config default as -s takes it: 1,2,3 for a tuple, true/false, none."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def settings_help():
    """The help's list of every detector's -s keys with their defaults, from the Config
    dataclasses themselves (a hand-written list would fall behind them)."""
    lines = ["Detector settings, -s KEY=VALUE, with their defaults (README, \"Detector settings\", says what "
             "each does):", "", "\b"]
    for name, detector in DETECTORS.items():
        keys = " ".join(f"{f.name}={setting_text(f.default)}" for f in dataclasses.fields(detector.Config))
        lines += textwrap.wrap(keys, 76, initial_indent=f"  {name:<13}", subsequent_indent=" " * 15,
                               break_on_hyphens=False)
    return "\n".join(lines)


def layouts_help(labelled_only):
    """The data layouts --data reads, named from LAYOUTS (and VisA, found by its split file)."""
    named = [f"{layout} ({train}/)" for layout, train, *_ in LAYOUTS]
    named.append(f"VisA (a category folder beside {VISA_SPLIT})")
    return ", ".join(named) + ("" if labelled_only else ", or a plain folder of good images (searched recursively)")


def fit_options(f):
    """The options of fit and bench that say how a detector is fitted; with run_options,
    they are the fields of RunOptions, whose defaults they show."""
    d = RunOptions()
    return _decorate(f, [
        click.option("--backbone", type=click.Choice(list(BACKBONES)), default=d.backbone, show_default=True,
                     help="Backbone, in torchvision's layout (truncated after the deepest layer used)."),
        click.option("--weights", default=d.weights, show_default=True,
                     help="imagenet (torchvision's, downloaded once), none (random init), or a state-dict PATH."),
        click.option("--image-size", default=str(d.image_size), show_default=True, metavar="N|HxW|native",
                     help="Working size every image is brought to: N (square), HxW (height x width), or native "
                          "(each image's own size; needs --tile)."),
        click.option("--resize", type=click.Choice(RESIZES), default=d.resize, show_default=True,
                     help="fit: stretch to the size; pad: keep the aspect ratio and letterbox (the borders are "
                          "never scored); crop: keep the aspect ratio and cut the overhang."),
        click.option("--tile", type=click.IntRange(32), default=d.tile, help="Cut the working image into TILE x "
                     "TILE squares, each scored at full resolution, maps blended back [default: no tiling]."),
        click.option("--tile-overlap", type=FiniteRange(0, 1, max_open=True), default=d.tile_overlap,
                     show_default=True, help="Fraction by which neighbouring tiles overlap."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=d.seed, show_default=True,
                     help="Seeds every random choice."),
        click.option("--holdout", type=FiniteRange(0, 1, max_open=True), default=d.holdout, show_default=True,
                     help="Fraction of normal training images kept out to calibrate the threshold."),
        click.option("--epochs", type=click.IntRange(1), default=d.epochs, help="Training epochs of the detectors "
                     "that train (efficientad, autoencoder) [default: their own]."),
        click.option("--max-train", type=click.IntRange(2), default=d.max_train, help="Fit on a seeded subset of "
                     "this many training images (to see how a detector does with few) [default: all]."),
        click.option("-s", "--set", "settings", multiple=True, metavar="KEY=VALUE",
                     help="Detector setting, repeatable (e.g. -s coreset_ratio=0.01); the keys and their "
                          "defaults are listed below."),
    ])


def run_options(fitting):
    """The options every command shares: --precision (for a fitted model, by default the
    one it was fitted with), --device, --batch-size and --quiet."""
    d = RunOptions()
    if fitting:
        precision = click.option("--precision", type=click.Choice(PRECISIONS), default=d.precision, show_default=True,
                                 help="Number format of the backbone and of training; statistics and distances stay "
                                      "fp32/fp64; auto is fp32 (README: Precision, CPUs and threads).")
    else:
        precision = click.option("--precision", type=click.Choice(("model",) + PRECISIONS), default="model",
                                 show_default=True, help="Number format of the backbone; model: the one it was "
                                 "fitted and calibrated with; auto is fp32.")
    return lambda f: _decorate(f, [
        precision,
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=d.device, show_default=True,
                     help="Where the model runs: auto is cuda when a GPU is available, else cpu."),
        click.option("--batch-size", type=click.IntRange(1), default=d.batch_size, show_default=True,
                     help="Model inputs (images, or tiles) per forward pass."),
        click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr but warnings and errors (no progress "
                     "bars, notes or request log)."),
    ])


def _verbosity(quiet):
    global VERBOSE
    VERBOSE = not quiet


@click.group()
@click.version_option(__version__, prog_name="vad")
def cli():
    """vad: find and localize defects in images after seeing only defect-free examples.

    \b
      python vad.py fit --model padim --data mvtec/bottle
      python vad.py score bottle-padim.pt images/*.png
      python vad.py bench --model padim --model patchcore --data mvtec/bottle
    """


@cli.command("fit", short_help="Fit a detector on good images (or add some to a model).", epilog=settings_help())
@click.option("--model", "model", type=click.Choice(list(DETECTORS)), default="patchcore", show_default=True,
              help="Detector: padim and patchcore need no training, efficientad and autoencoder train.")
@click.option("--data", type=click.Path(path_type=Path), help=f"The good images: {layouts_help(False)} [default: "
              f"the embedded synthetic 'surface' set].")
@click.option("--out", type=click.Path(path_type=Path), help="Model file [default: <category>-<model>.pt]; an "
              "existing file is replaced only if it is a vad model.")
@click.option("--force", is_flag=True, help="Let --out replace an existing file that is not a vad model.")
@click.option("--update", "update_file", type=click.Path(path_type=Path), help="Add the normal images of --data to "
              "this fitted PaDiM or PatchCore model, with its own settings; written to --out, or back to it.")
@fit_options
@run_options(fitting=True)
def fit_command(model, data, out, force, update_file, quiet, **options):
    """Fit a detector on normal images and write one .pt model file, or add normal
    images to a fitted one (--update; the file is replaced only if that succeeds).

    \b
      python vad.py fit --model padim --data mvtec/bottle
      python vad.py fit --model patchcore --data parts/ --backbone resnet18 -s coreset_ratio=0.01 --out parts.pt
      python vad.py fit --model padim --data parts/ -s updatable=true --out parts-padim.pt
      python vad.py fit --update parts-padim.pt --data parts_new/
    """
    _verbosity(quiet)
    if update_file is not None:
        ctx = click.get_current_context()
        names = {p.name: p.opts[0] for p in ctx.command.params}
        given = [names[k] for k in ["model", *options] if k not in ("device", "batch_size")
                 and ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise CliError(f"--update keeps the model's own settings: drop {', '.join(given)}")
        if data is None:
            raise CliError("--update needs --data, the new normal images")
        if update_file.suffix.lower() == ".onnx":
            raise CliError(f"{update_file} is an exported model: update the .pt it came from, then export it again")
        out = out or update_file
        check_model_out(out, [data], force)
        lock_models(update_file, out)
        detector = run_api(load, update_file, options["device"])
        run_api(update, detector, data, options["batch_size"])
        run_api(save, detector, out)
        note(f"{detector.info['added']} images added since fit, threshold {float(detector.threshold):.4g}; "
             f"{frr_text(detector.info)}, on the {len(detector.held_out_scores)} held-out images")
        click.echo(str(out))
        return
    if data is None:
        data = synthetic_data()[0]
        note(f"no --data: using the embedded synthetic set {data} (a smoke test, not a benchmark)")
    out = out or Path(f"{Path(data).resolve().name}-{model}.pt")
    weights = [Path(options["weights"])] if options["weights"] not in ("imagenet", "none") else []
    check_model_out(out, [data, *weights], force)
    lock_models(out)
    start = time.perf_counter()
    detector = run_api(fit, data, model, RunOptions(**options))
    run_api(save, detector, out, detector.info)
    note(f"fitted in {time.perf_counter() - start:.1f}s, threshold {float(detector.threshold):.4g}")
    click.echo(str(out))


def check_writable(path, option):
    """Refuse, before a long run, an output file that could not be written at the end."""
    if path.is_dir():
        raise CliError(f"{option} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise CliError(f"{option} {path}: cannot write there ({e.strerror or e}); choose another path") from None


def is_bench_json(path):
    """Whether `path` holds what bench --json writes: a JSON list of result rows."""
    try:
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            return False
        rows = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and {"category", "model"} <= set(r) for r in rows)


def check_output(path, option, ours, kind, reads=(), force=None):
    """The one rule for a file a command writes (fit, calibrate and export --out, bench
    --json), checked before any work: it can be written; it is none of the command's
    inputs (`reads`: files, and folders whose images are read); and an existing file is
    replaced only if `ours(path)` says vad wrote it as this `kind` of output, or with
    --force where the command has it (force=False; None: no such option)."""
    check_writable(path, option)
    if not (path.exists() or path.is_symlink()):
        return
    target = path.resolve()
    for item in map(Path, reads):
        if target == item.resolve() or item.is_dir() and (
                (is_image(path) and target.is_relative_to(item.resolve()))
                or any(p.resolve() == target for p in item.rglob("*") if is_image(p))):
            raise CliError(f"{option} {path} is one of this command's inputs, in {item} (training images, weights, "
                           f"images to check or score); write it elsewhere")
    if not force and not ours(path):
        raise CliError(f"{option} {path} exists and is not {kind}; choose another name"
                       + (", or add --force to replace it" if force is False else ""))


def check_model_out(out, reads, force, suffix=".pt"):
    """check_output for a model file: a .pt (fit, calibrate), or its .onnx export."""
    if (out.suffix.lower() == ".onnx") != (suffix == ".onnx"):
        raise CliError(f"--out {out}: " + ("give a file name ending in .onnx (score and serve tell models apart by "
                                           "it)" if suffix == ".onnx" else "a .onnx name is for exports (vad.py "
                                                                           "export); give the model a .pt name"))
    check_output(out, "--out", lambda p: is_vad_model(p) or is_vad_export(p), "a vad model file", reads, force)


def _expand_inputs(inputs, null=False):
    """PATH arguments (files, folders, '-' for paths on stdin, one per line or, with
    null, NUL-separated) -> (image paths in order, the folders among the arguments)."""
    paths, folders = [], []
    for item in inputs:
        if item == "-":
            text = sys.stdin.buffer.read().decode(errors="surrogateescape")
            entries = text.split("\0") if null else [line.removesuffix("\r") for line in text.split("\n")]
            paths += [Path(entry) for entry in entries if entry]
        elif Path(item).is_dir():
            folders.append(Path(item))
            paths += list_images(item)
        else:
            paths.append(Path(item))
    return paths, folders


def parse_shard(text):
    """--shard K/N -> (K, N), 0 <= K < N."""
    match = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([0-9]{1,9})\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise CliError(f"--shard {text}: give K/N with N >= 1 and K from 0 to N-1, e.g. --shard 0/4")
    return int(match[1]), int(match[2])


def shard_of(paths, k, n):
    """The k-th of n contiguous, near-equal slices of paths (0-based): the slices cover
    every path once, and joined in k order they are paths in its own order."""
    return paths[k * len(paths) // n: (k + 1) * len(paths) // n]


def tsv_field(text):
    """A path as one tab-separated field on one line: backslash, tab, newline and
    carriage return written as \\\\, \\t, \\n and \\r (the escaping of PostgreSQL's text format),
    and a NUL, which only an error message can hold, as \\0."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\0", "\\0"))


def output_paths(paths, folders, directory, option, suffix):
    """Where `--heatmaps/--maps DIR` puts each image's output: DIR/<its path below the
    inputs' common folder>/<its file name> + suffix, the image's own extension kept so
    that a.png and a.jpg do not collide. Refuses (CliError) a DIR that is, or lies in, a
    folder of inputs, and any output that would be an input file."""
    readable = [p for p in paths if "\0" not in str(p)]  # a NUL path is an error of its own
    if not readable:
        return {}
    resolved = [p.resolve() for p in readable]
    home = directory.resolve()
    inside = [f.resolve() for f in folders if home.is_relative_to(f.resolve())]  # scanned recursively
    inside += [p.parent for p in resolved if home == p.parent]
    if inside:
        raise CliError(f"--{option} {directory} is in {inside[0]}, which holds the images being scored; "
                       f"write the {option} to a folder outside it")
    parent = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    outputs = {p: home / r.relative_to(parent).parent / (r.name + suffix) for p, r in zip(readable, resolved)}
    # Where each output really lands: a link inside DIR may lead into the inputs.
    landing = {out.resolve() for out in outputs.values()}
    clash = landing & set(resolved)
    parents = {p.parent for p in resolved}
    inside = [d for d in landing if d.parent in parents or any(d.is_relative_to(f.resolve()) for f in folders)]
    if clash or inside:
        raise CliError(f"--{option} {directory} would write into the images being scored "
                       f"({min(clash) if clash else inside[0]}, through a link); choose another folder")
    return outputs


def json_path(path):
    """{"path": PATH} for a JSON line. A name that is not UTF-8 (a Linux name may hold
    any bytes but / and NUL) cannot be JSON text as it is: its undecodable bytes are
    written \\xHH in "path", and "path_base64" gives its exact bytes."""
    text = str(path)
    try:
        text.encode("utf-8")
        return {"path": text}
    except UnicodeEncodeError:
        raw = os.fsencode(text)
        return {"path": raw.decode("utf-8", "backslashreplace"), "path_base64": base64.b64encode(raw).decode()}


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@cli.command("score", short_help="Score images: score, verdict and defect regions of each.")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of tab-separated text.")
@click.option("--heatmaps", type=click.Path(path_type=Path), help="Write each image with its map overlaid here, "
              "as <name>.<ext>.png (a folder outside the inputs).")
@click.option("--maps", type=click.Path(path_type=Path), help="Write each raw anomaly map here, as <name>.<ext>.npy "
              "(float32, the image's own size, NaN where not inspected).")
@click.option("--masks", type=click.Path(path_type=Path), help="Write each binary defect mask (map above the pixel "
              "threshold: 255, else 0) here, as <name>.<ext>.mask.png at the image's own size.")
@click.option("--threshold", type=FiniteRange(), help="Judge with this image threshold instead of the model's, "
              "for this run (vad.py calibrate changes the model's).")
@click.option("--pixel-threshold", type=FiniteRange(), help="Outline every image's map above this value, whatever its "
              "verdict [default: the verdict decides (README: Thresholds and defect regions)].")
@click.option("--null", "-0", "null", is_flag=True, help="Paths on stdin ('-') are NUL-separated (find -print0).")
@click.option("--fail-on-anomaly", is_flag=True, help="Exit 1 when any image is judged anomalous.")
@click.option("--shard", metavar="K/N", help="Score only the K-th of N near-equal slices of the inputs, K from 0 "
              "to N-1 (a Kubernetes Indexed Job's JOB_COMPLETION_INDEX); the slices' outputs, joined in K order, "
              "list every input once, in the unsharded order.")
@run_options(fitting=False)
def score_command(model_file, inputs, as_json, heatmaps, maps, masks, threshold, pixel_threshold, null,
                  fail_on_anomaly, shard, precision, device, batch_size, quiet):
    """Score images with a fitted model: one line per image on stdout,
    "PATH<TAB>SCORE<TAB>ok|anomalous<TAB>MARGIN" (score - threshold), in input order (a
    tab, newline, carriage return or backslash in PATH written as \\t, \\n, \\r, \\\\;
    --json gives the path exactly, with the thresholds and the defect regions: box, area,
    peak and centroid of each connected region of the map, in the image's own pixels;
    an ok image has none, an anomalous one at least one).

    MODEL_FILE is a .pt from fit, or a .onnx from export (run with ONNX Runtime). INPUTS
    are image files, folders (searched recursively) or '-' for one path per line on stdin
    (NUL-separated with -0). Errors go to stderr, one line each, never stdout.

    The run ends with a summary on stderr: images scored, anomalous and unreadable, and
    how many good-verdict scores exceed the 95th percentile of the model's held-out
    scores, against the share they imply; a warning says when that share has drifted
    up (beta-binomial test, p < 0.001; README, "Drift on the line").

    \b
    Exit status:
      0  every image scored
      1  with --fail-on-anomaly: every image scored, at least one anomalous
      2  usage or model-file error (nothing scored)
      3  some images could not be read, or their heat map, map or mask not written
         (each reported; every other image scored and written)

    \b
      python vad.py score bottle-padim.pt test/*/*.png
      find line3/ -name '*.png' -print0 | python vad.py score bottle-padim.pt - -0 --json --heatmaps out/
    """
    _verbosity(quiet)
    part = parse_shard(shard) if shard is not None else None
    detector = run_api(load_model, model_file, device, precision)
    for option, value in (("--threshold", threshold), ("--pixel-threshold", pixel_threshold)):
        if value is not None and not math.isfinite(value):
            raise CliError(f"{option} {value}: give a finite number")
    if threshold is not None:
        detector.threshold.fill_(threshold)
    paths, folders = _expand_inputs(inputs, null)
    if not paths:
        raise CliError("no images to score: give image files, folders, or - to read paths from stdin")
    if part:
        total, paths = len(paths), shard_of(paths, *part)
        note(f"--shard {shard}: {len(paths)} of {total} images")
        if not paths:
            return
    for option, directory in (("--heatmaps", heatmaps), ("--maps", maps), ("--masks", masks)):
        if directory and (directory.exists() or directory.is_symlink()) and not directory.is_dir():
            raise CliError(f"{option} {directory} is a file; give a folder")
    outputs = {option: output_paths(paths, folders, directory, option, suffix)
               for option, directory, suffix in (("heatmaps", heatmaps, ".png"), ("maps", maps, ".npy"),
                                                 ("masks", masks, ".mask.png")) if directory}
    landing = collections.Counter(p.resolve() for paths_of in outputs.values() for p in paths_of.values())
    clash = [p for p, count in landing.items() if count > 1]
    if clash:
        raise CliError(f"two outputs would be written to {clash[0]} (an input's heat map, map or mask has another's "
                       f"name); give --heatmaps, --maps and --masks folders of their own")
    if model_file.resolve() in landing:
        raise CliError(f"an output would be written over the model file {model_file}; choose another folder")
    for paths_of in outputs.values():  # the one rule (check_output): replace only what vad wrote there
        # (a folder at an output's name is no file to lose: writing there fails, and is reported)
        odd = next((p for p in paths_of.values() if (p.is_file() or p.is_symlink() and not p.exists())
                    and not is_vad_output(p)), None)
        if odd:
            raise CliError(f"{odd} exists and is not a heat map, map or mask vad wrote; choose another folder, "
                           f"or move it away")
    for directory in (heatmaps, maps, masks):
        if directory and directory.is_dir():
            remove_stale_temporaries_in(directory)
    model_pixel_threshold, low = float(detector.pixel_threshold), float(detector.map_low)
    failed = unwritten = anomalous = 0
    monitor = DriftMonitor(detector)

    def heat_map(r):  # the map for a heat map: at the image's size, or scaled down as serve draws it
        size = fit_within(r.source_size, MAX_OVERLAY_SIDE)
        return anomaly_map if size == tuple(r.source_size) else map_to_source(r.anomaly_map, r.source_size,
                                                                               detector.framing, size)
    for r in one_line_errors(score_files(detector, paths, batch_size)):
        monitor.add(r)
        if r.error:
            click.echo(f"error: {tsv_field(r.error)}", err=True)
            failed += 1
            continue
        anomaly_map = map_to_source(r.anomaly_map, r.source_size, detector.framing) if outputs or as_json else None
        anomalous += r.verdict == "anomalous"
        level = pixel_threshold if pixel_threshold is not None or anomaly_map is None else \
            region_level(anomaly_map, r.verdict == "anomalous", model_pixel_threshold, low)
        record = json_path(r.path) | {"score": r.score, "threshold": r.threshold, "verdict": r.verdict,
                                      "margin": r.score - r.threshold}
        if as_json:
            regions, count = defect_regions(anomaly_map, level)
            record |= {"pixel_threshold": model_pixel_threshold, "region_threshold": level, "regions": regions,
                       "region_count": count}
        for option, key, write in (("heatmaps", "heatmap", lambda f: f.write_bytes(heatmap_png(detector, r.path,
                                                                                                heat_map(r), level))),
                                   ("maps", "map", lambda f: f.write_bytes(npy_bytes(anomaly_map))),
                                   ("masks", "mask", lambda f: f.write_bytes(mask_png(anomaly_map, level)))):
            if option in outputs:
                try:
                    # a failed write leaves an older file at that name untouched
                    atomic_write(outputs[option][r.path], write, durable=False)
                    record[key] = json_path(outputs[option][r.path])["path"]
                except OSError as e:
                    click.echo(f"error: cannot write the {key} of {tsv_field(str(r.path))} to "
                               f"{tsv_field(str(outputs[option][r.path]))}: {e.strerror or e}", err=True)
                    unwritten += 1
        click.echo(json_text(record) if as_json else
                   f"{tsv_field(str(r.path))}\t{r.score:.6g}\t{r.verdict}\t{record['margin']:.6g}")
    if failed:
        click.echo(f"error: {failed} of {len(paths)} image(s) could not be read", err=True)
    if unwritten:
        click.echo(f"error: {unwritten} output file(s) could not be written", err=True)
    note(monitor.summary())
    if monitor.warning():
        warn(monitor.warning())
    if failed or unwritten:
        sys.exit(3)
    if fail_on_anomaly and anomalous:
        sys.exit(1)


@cli.command("calibrate", short_help="Set a model's threshold from good (and bad) images.")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--good", "good_dirs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Folder (or file) of good images from the line, repeatable.")
@click.option("--bad", "bad_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Folder (or file) of defective images, repeatable (needed for --max-f1).")
@click.option("--target-frr", type=FiniteRange(0, 1, max_open=True),
              help="Reject at most this fraction of the good images [default: 0.01, unless --max-f1].")
@click.option("--max-f1", is_flag=True, help="The threshold with the best F1 on the good and bad images.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the calibrated model here [default: rewrite "
              "MODEL_FILE in place, atomically].")
@run_options(fitting=False)
def calibrate_command(model_file, good_dirs, bad_dirs, target_frr, max_f1, out, precision, device, batch_size, quiet):
    """Set a model's image threshold from labelled images of your line: by the false
    reject rate on good images (--target-frr), or by F1 when defective images are given
    (--max-f1). Prints the confusion counts before and after. Use images that were not
    used to fit the model, and never the test images you report results on.

    \b
      python vad.py calibrate bottle-padim.pt --good line3/ok --target-frr 0.005
      python vad.py calibrate bottle-padim.pt --good line3/ok --bad line3/rejects --max-f1
    """
    _verbosity(quiet)
    if max_f1 and target_frr is not None:
        raise CliError("give --target-frr or --max-f1, not both")
    if max_f1 and not bad_dirs:
        raise CliError("--max-f1 needs defective images: add --bad DIR")
    if model_file.suffix.lower() == ".onnx":
        raise CliError(f"{model_file} is an exported model: calibrate the .pt it came from, then export it again")
    out = out or model_file
    if out != model_file:
        check_model_out(out, [*good_dirs, *bad_dirs], None)
    lock_models(model_file, out)
    detector = run_api(load, model_file, device, precision)

    def scores(items, what):
        paths = _expand_inputs([str(p) for p in items])[0]
        if not paths:
            raise CliError(f"no {what} images found in {', '.join(map(str, items))}")
        return np.array([r.score for r in run_api(every_image, score_files(detector, paths, batch_size, what))])
    good = scores(good_dirs, "good")
    bad = scores(bad_dirs, "bad") if bad_dirs else np.array([])
    before = float(detector.threshold)
    target = 0.01 if target_frr is None else target_frr
    if 0 < target < MIN_FRR:
        raise CliError(f"--target-frr {target:g}: give 0 (reject none of the good images) or a rate of at least "
                       f"{MIN_FRR:g}; lower rates cannot be told apart on any line's good images")
    if max_f1:
        after, rule = threshold_for_f1(good, bad), f"max-f1 on {len(good)} good and {len(bad)} bad images"
    elif target == 0 or len(good) >= images_needed(target):  # 0: reject none of these, as asked
        after = threshold_for_frr(good, target)
        rule = f"target-frr {target}: empirical, on {len(good)} good images"
    else:  # the highest good score would state no rate at all: an extrapolation that says it is one
        warn(f"{len(good)} good images cannot support a false-reject rate of {target} empirically: that takes "
             f"at least {images_needed(target)} (none of them rejected bounds the rate at {target} with "
             f"{CONFIDENCE:.0%} confidence); the threshold is placed by an exponential tail fitted to the good "
             f"scores above their median")
        after = tail_threshold(good, target)
        rule = f"target-frr {target}: exponential tail over the median of {len(good)} good images"
        if after == good.max():
            warn(f"the good scores have no spread above their median to fit a tail to ({len(good)} image(s)): the "
                 f"threshold is the highest good score, {after:.6g}, and its bound below shows how little that "
                 f"tells; give more, and more varied, good images")
    for label, t in (("before", before), ("after", after)):
        c = confusion(good, bad, t)
        click.echo(f"{label}: threshold {t:.6g}: good {c['good_ok']} ok, {c['good_rejected']} rejected"
                   + (f"; bad {c['bad_caught']} caught, {c['bad_missed']} missed" if len(bad) else ""))
    if not math.isfinite(after):
        raise CliError(f"the calibrated threshold is {after}, not a finite number; the model file is unchanged")
    held_out = detector.held_out_scores.cpu().numpy()
    fitted = threshold_from(held_out) if len(held_out) else before
    if after < fitted:
        warn(f"the threshold {after:.6g} is below the one fit set from the held-out images ({fitted:.6g}): "
             f"more images will be judged anomalous than the fitted model judged")
    detector.threshold.fill_(after)
    detector.info = {**detector.info, "calibrated": rule, **frr_record(good, after, rule)}
    detector.info = with_history(detector.info, event="calibrate", good=len(good), bad=len(bad), threshold=after,
                                 rule=rule)
    click.echo(frr_text(detector.info))
    run_api(save, detector, out)
    note(f"wrote {out}")


def model_card(model, path):
    """What a model file (.pt, or an .onnx from export) is, for vad.py info: everything
    recorded in it, read through load_model's checks only."""
    info, onnx = model.info, isinstance(model, OnnxModel)

    def recorded(key):
        return info.get(key, "not recorded")
    try:
        settings = json.loads(info["settings"], parse_constant=_not_finite) if onnx else \
            dataclasses.asdict(model.config)
    except (KeyError, TypeError, ValueError):
        settings = "not recorded"
    rejected, images, bound = info.get("frr_rejected"), info.get("frr_images"), info.get("frr_bound")
    known = type(rejected) is int and type(images) is int and 0 <= rejected <= images > 0 \
        and type(bound) is float and 0 <= bound <= 1  # a crafted info is shown as not recorded, never trusted
    dropped = info.get("history_dropped", 0)
    return {
        "file": str(path),
        "format": f"{ONNX_FORMAT} {ONNX_FORMAT_VERSION} (ONNX Runtime)" if onnx else f"{FORMAT_NAME} {FORMAT_VERSION}",
        "vad_version": model.vad_version,
        "sha256": model.sha256 if not onnx else None,
        "source_sha256": model.sha256 if onnx else None,
        "detector": model.name,
        "backbone": getattr(model.config, "backbone", None),
        "weights": {"setting": recorded("weights"), "file": info.get("weights_file"),
                    "sha256": info.get("weights_sha256")},
        "settings": settings,
        "framing": dataclasses.asdict(model.framing),
        "input_size": list(model.input_size),
        "precision": model.precision,
        "thresholds": {"image": float(model.threshold), "pixel": float(model.pixel_threshold),
                       "rule": info.get("calibrated", info.get("threshold_rule", HELD_OUT_RULE)),
                       "pixel_rule": f"{HELD_OUT_RULE} of each held-out map's maximum; regions only on anomalous "
                                     f"images, at least one each (README: Thresholds and defect regions)"},
        "false_reject": {"rejected": rejected, "images": images, "rate": rejected / images,
                         "upper_bound": bound, "confidence": CONFIDENCE} if known else None,
        "training": {"data": recorded("data"), "layout": recorded("layout"), "images": recorded("images"),
                     "held_out": recorded("held_out"), "added": recorded("added"), "seed": recorded("seed"),
                     "holdout": recorded("holdout"), "fingerprint": recorded("data_fingerprint")},
        "history": read_history(info),
        "history_dropped": dropped if type(dropped) is int and dropped >= 0 else 0,
        "update": update_support(model) if not onnx else "no: update the .pt, then export again",
        "export_parity": model.parity if onnx else None,
    }


@cli.command("info", short_help="Show what a model file is and how its thresholds were set.")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def info_command(model_file, as_json):
    """Show what a model file is: detector, backbone and weights, settings, framing,
    precision, both thresholds and the rule that set them, the false-reject rate they
    imply with its 95% upper bound, the training data (layout, folder, count and a
    fingerprint of its file list), calibrations and updates in order, and, for an
    .onnx, the export's parity check. Reads the file through the checks score applies.

    \b
      python vad.py info bottle-padim.pt
      python vad.py info bottle-padim.onnx --json
    """
    _verbosity(True)
    card = model_card(run_api(load_model, model_file), model_file)
    try:
        text = json.dumps(card, allow_nan=False)
    except ValueError:  # load checks the info's types, not that its numbers are finite
        raise CliError(f"{model_file} records NaN or an infinite number in its info; fit it again") from None
    if as_json:
        click.echo(text)
        return
    t, frr, data, w = card["thresholds"], card["false_reject"], card["training"], card["weights"]
    lines = [f"file: {card['file']} ({card['format']}, written by vad {card['vad_version']})",
             f"detector: {card['detector']}, backbone {card['backbone'] or '-'}, {card['precision']}",
             f"weights: {w['setting']}" + (f" ({w['file']}, sha256 {w['sha256'] or 'unknown'})" if w["file"] else ""),
             f"settings: {json.dumps(card['settings'])}",
             f"framing: {json.dumps(card['framing'])}, input {card['input_size'][0]}x{card['input_size'][1]}",
             f"image threshold: {t['image']:.6g} ({t['rule']})",
             f"pixel threshold: {t['pixel']:.6g} ({t['pixel_rule']})",
             frr_text(card["false_reject"] and {"frr_rejected": frr["rejected"], "frr_images": frr["images"],
                                                "frr_bound": frr["upper_bound"]} or {}),
             f"training data: {data['data']} ({data['layout']}), {data['images']} images fitted, "
             f"{data['held_out']} held out, {data['added']} added; fingerprint {data['fingerprint']}"]
    lines += [f"history {i}: " + ", ".join(f"{k} {v}" for k, v in e.items())
              for i, e in enumerate(card["history"], card["history_dropped"] + 1)]
    lines.append(f"fit --update: {card['update']}")
    if card["export_parity"] is not None:
        lines.append(f"export parity: {card['export_parity']}")
    if card["source_sha256"]:
        lines.append(f"exported from: the .pt with sha256 {card['source_sha256']}")
    elif card["sha256"]:
        lines.append(f"sha256: {card['sha256']}")
    # A crafted file's strings: no escape sequence reaches the terminal.
    click.echo("\n".join(printable(line) for line in lines))


@cli.command("export", short_help="Export a model to one ONNX file that runs without torch.")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="The ONNX file [default: MODEL_FILE with .onnx]; "
              "an existing file is replaced only if it is a vad model or export.")
@click.option("--force", is_flag=True, help="Let --out replace an existing file that vad did not write.")
@click.option("--check-images", multiple=True, type=click.Path(path_type=Path),
              help="Also check parity on these images (files or folders, repeatable), framed as the model frames.")
@click.option("--batch-size", type=click.IntRange(1), default=BATCH_SIZE, show_default=True,
              help="Model inputs per run during the check.")
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr but warnings and errors.")
def export_command(model_file, out, force, check_images, batch_size, quiet):
    """Export a fitted model to one ONNX file: a graph from images (N, 3, H, W), RGB in
    [0, 1] at the model's input size, to image scores (N,) and anomaly maps (N, H, W),
    with the framing, thresholds and provenance in its metadata. Before writing, ONNX
    Runtime runs the graph beside the .pt on synthetic inputs (and --check-images):
    nothing is written unless the scores agree to 1e-4 and the maps to 1e-3, relative.
    Needs the optional extras: pip install onnx onnxruntime.

    \b
      python vad.py export bottle-padim.pt                  # -> bottle-padim.onnx
      python vad.py score bottle-padim.onnx test/*/*.png    # scored by ONNX Runtime
    """
    _verbosity(quiet)
    if model_file.suffix.lower() == ".onnx":
        raise CliError(f"{model_file} is already an exported model; export the .pt it came from")
    out = out or model_file.with_suffix(".onnx")
    check_model_out(out, check_images, force, ".onnx")
    for module in ("onnx", "onnxruntime"):  # before a long load
        run_api(optional_import, module)
    images = []
    if check_images:
        images = _expand_inputs([str(p) for p in check_images])[0]
        if not images:
            raise CliError(f"--check-images: no images in {', '.join(map(str, check_images))}")
    detector = run_api(load, model_file, "cpu", "model")
    data = run_api(export, detector, images, batch_size)
    run_api(save_onnx, data, out)
    note(f"wrote {out} ({len(data) / 2**20:.1f} MiB)")
    click.echo(str(out))


@cli.command("bench", short_help="Fit and evaluate on labelled data; print a metrics table.", epilog=settings_help())
@click.option("--model", "models", multiple=True, type=click.Choice(list(DETECTORS)),
              help="Detector to benchmark, repeatable [default: padim and patchcore, which need no training].")
@click.option("--data", "data", multiple=True, type=click.Path(path_type=Path),
              help=f"Labelled category folder, repeatable, in a layout vad reads: {layouts_help(True)} "
                   f"[default: the embedded synthetic set].")
@click.argument("more_data", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "json_file", type=click.Path(path_type=Path), help="Also write the results as JSON here.")
@click.option("--runtime", "runtimes", default="torch", show_default=True, metavar="LIST",
              help="Comma-separated: torch (the .pt), onnxruntime (its export, parity-checked first; needs "
                   "pip install onnx onnxruntime). One table row per model and runtime.")
@fit_options
@run_options(fitting=True)
def bench_command(models, data, more_data, json_file, runtimes, quiet, **options):
    """Fit on train/good and evaluate on test/ of each category: prints a markdown table
    with image and pixel AUROC, AUPRO, precision/recall/F1/accuracy at the calibrated
    threshold, F1-max (an oracle: it peeks at test labels), fit time, score time and
    peak memory. Extra arguments after --data are more category folders.

    \b
      python vad.py bench
      python vad.py bench --model padim --data mvtec/bottle mvtec/cable --backbone resnet18
      python vad.py bench --model patchcore --data mvtec/bottle --runtime torch,onnxruntime
    """
    _verbosity(quiet)
    o = RunOptions(**options)
    dirs = list(data) + list(more_data)
    if json_file:
        check_output(json_file, "--json", is_bench_json, "a JSON file of bench results", dirs)
    if not dirs and o.weights == "imagenet":
        try:
            load_backbone_weights(o.backbone, "imagenet")
        except VadError as e:
            warn(str(e))
            warn("=" * 72)
            warn("RANDOM WEIGHTS: ImageNet weights are unavailable, so this smoke test runs with a")
            warn("randomly initialised backbone (--weights none). Accuracy is NOT representative.")
            warn("=" * 72)
            o = dataclasses.replace(o, weights="none")
    if not dirs:
        note("no --data: benchmarking the embedded synthetic set (a smoke test, not a benchmark)")
    runtimes = tuple(r.strip() for r in runtimes.split(",") if r.strip())
    results = run_api(bench, dirs or None, models or ("padim", "patchcore"), o, runtimes)
    label = {"none": "random init (NOT pretrained)", "imagenet": "torchvision ImageNet"}.get(o.weights, o.weights)
    source = ", ".join(map(str, dirs)) if dirs else "the embedded synthetic set (a smoke test, not a benchmark)"
    framing = f"image size {o.image_size} {o.resize}" + (f", tiles {o.tile} overlap {o.tile_overlap}" if o.tile else "")
    framing += f"; at most {o.max_train} training images" if o.max_train else ""
    dtype = results[0]["dtype"] if results else o.precision
    where = results[0]["machine"] if results else machine()
    click.echo(f"data: {source}\nweights: {label}; {framing}; {dtype}; seed {o.seed}; vad {__version__}\n"
               f"machine: {where['cpu']} ({where['isa']}), {where['threads']} threads of {where['cores']} cores, "
               f"torch {where['torch']}\n")
    click.echo(bench_table(results))
    if json_file:
        atomic_write(json_file, lambda tmp: Path(tmp).write_text(json_text(results, indent=2)))


@cli.command("serve", short_help="Serve an inspection page, a JSON API and /metrics.")
@click.argument("model_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (the log line says which).")
@click.option("--max-bytes", type=click.IntRange(1), default=MAX_UPLOAD_BYTES, show_default=True,
              help="Largest request body accepted; larger ones get 413.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="A host name clients may use besides IP addresses and localhost (repeatable); "
                   "requests naming any other host get 421.")
@run_options(fitting=False)
def serve_command(model_files, host, port, max_bytes, allow_hosts, precision, device, batch_size, quiet):
    """Serve an upload-and-inspect page and a JSON endpoint for fitted models.

    \b
      GET  /                       the page: pick a model, drop an image, see the verdict and map
      POST /score?model=NAME       raw image bytes or multipart form data -> JSON score,
                                   threshold, verdict (add &overlay=1 for a PNG data URL)
      GET  /models                 the models, their settings and thresholds
      GET  /health                 {"status": "ok", "models": N, "drift": true|false}
      GET  /metrics                Prometheus text format: requests, latencies, verdicts,
                                   scores and each model's drift window (last 500 verdicts)

    A model's NAME is its file name without .pt (or .onnx: an exported model, run with
    ONNX Runtime). Behind a reverse proxy or under a DNS
    name, give that name with --allow-host: other names are refused, so that no web
    page can send its visitors' browsers here under a name of its own (DNS rebinding).

    \b
      python vad.py serve bottle-padim.pt screw-patchcore.pt --port 8000
      curl --data-binary @part.png 'http://127.0.0.1:8000/score?model=bottle-padim'
      python vad.py serve bottle-padim.pt --host 0.0.0.0 --allow-host inspect.example.com
    """
    _verbosity(quiet)
    models = {}
    for path in model_files:
        if path.stem in models:
            raise CliError(f"two models named {path.stem!r}: rename one file")
        models[path.stem] = run_api(load_model, path, device, precision)
    raise_open_file_limit()
    try:
        server = InspectionServer(models, (host, port), max_bytes, quiet, batch_size, allow_hosts)
    except OSError as e:
        raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    click.echo(f"serving {', '.join(models)} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main():
    """The command line, with SIGTERM (a service manager stopping vad, `kill`, a CI
    timeout) handled as Ctrl-C is: SystemExit runs every cleanup on its way out."""
    def stop(signum, frame):
        global STOP_SIGNAL
        STOP_SIGNAL = signum
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    cli()


if __name__ == "__main__":
    main()
