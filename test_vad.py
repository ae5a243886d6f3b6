"""
Tests for vad.py. Run with:

    python -m pytest -q test_vad.py

Everything runs on the CPU with random-init backbones (--weights none) and tiny
synthetic images written to pytest's tmp_path, so the suite needs no network, no
dataset and no GPU, and finishes in well under two minutes on two cores. The math is
checked against independent references (scipy, naive loops, hand-computed cases).
"""

import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

import click
import numpy as np
import click
import pytest
import scipy.ndimage
import scipy.spatial.distance
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

import vad

SIZE = 64  # image size for the detector tests: small enough to be fast on 2 cores

# Detector settings for tiny images and short training. At 64 px the autoencoder's default
# five halvings leave a 2x2 bottleneck; three give the 8x8 that the default gives 256 px
# images. EfficientAD's layer 3 is a 4x4 grid at 64 px, too coarse to place a 10 px defect.
# Measured (1 and 2 threads, AVX-512 and AVX2 kernels): image AUROC 1.0, pixel >= 0.98.
FAST = {"padim": ["d=40"], "patchcore": [], "efficientad": ["epochs=3", "augment_pool=2", "layers=1,2"],
        "autoencoder": ["epochs=10", "widths=32,64,128"]}

# -----------------------------------------------------------------------------
# Utilities: tiny synthetic data, fitted fixtures, the CLI runner


def texture(rng, size):
    """A striped grey texture with noise, different in every image."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = 120 + 30 * np.sin(2 * np.pi * (xx + yy) / 8 + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 8, (size, size))
    return np.repeat(base[..., None], 3, 2)


def save_png(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)


def make_dataset(root, size=SIZE, n_train=20, n_good=6, n_bad=6, seed=0):
    """MVTec layout: textures; the defective ones carry a pasted red square, with masks."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        save_png(texture(rng, size), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save_png(texture(rng, size), root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        image, mask = texture(rng, size), np.zeros((size, size))
        k = size // 6
        y, x = rng.integers(k, size - 2 * k, 2)
        image[y:y + k, x:x + k] = [220, 60, 40]
        mask[y:y + k, x:x + k] = 255
        save_png(image, root / "test" / "defect" / f"{i:03d}.png")
        save_png(mask, root / "ground_truth" / "defect" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "tiles")


def fit_tiny(model, data, seed=0, **kwargs):
    return vad.fit(data, model, backbone="resnet18", weights="none", image_size=SIZE, device="cpu",
                   seed=seed, settings=FAST[model], **kwargs)


FIXTURE_THREADS = torch.get_num_threads()  # the session's fitted models were fitted with this many


@pytest.fixture(scope="session")
def fitted(dataset):
    return {name: fit_tiny(name, dataset) for name in vad.DETECTORS}


@pytest.fixture
def threads(request):
    """Run the test with torch using request.param threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def cli(*args, input=None):
    return CliRunner().invoke(vad.cli, [str(a) for a in args], input=input)


TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", SIZE, "--device", "cpu", "-q"]


def png_header(width, height):
    """A PNG that claims width x height pixels but holds no image data: what a
    decompression bomb looks like before it is decoded."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def model_file(fitted, tmp_path):
    vad.save(fitted["padim"], tmp_path / "m.pt")
    return tmp_path / "m.pt"

# -----------------------------------------------------------------------------
# Errors, messages, device and precision


def test_isa_level_and_bf16_from_cpu_flags(monkeypatch):
    for flags, level, bf16 in [("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AMX", True),
                               ("avx2 avx512f avx512_bf16", "AVX-512", True), ("avx2 fma", "AVX2", False),
                               ("fp asimd", vad.platform.machine(), False)]:
        monkeypatch.setattr(vad, "cpu_info", lambda: ("faked", frozenset(flags.split())))
        assert vad.isa_level() == level and vad.cpu_has_bf16() == bf16


def test_precision_auto_is_fp32_and_half_runs_only_the_backbone(dataset):
    assert vad.pick_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(vad.VadError, match="precision"):
        vad.pick_precision("int8", torch.device("cpu"))
    paths = vad.read_dataset(dataset).train[:8]
    images = torch.stack([vad.read_image(p, SIZE) for p in paths])
    torch.manual_seed(0)
    fe = vad.FeatureExtractor("resnet18", (1, 2, 3), "none")
    reference = [f.double() for f in fe(images)]
    fe.set_precision("bf16")
    for f, ref in zip(fe(images), reference):  # bf16 keeps 8 bits of mantissa: ~1% relative error
        assert f.dtype == torch.float32 and ((f - ref).norm() / ref.norm()) < 0.03
    det = vad.PaDiM(vad.PaDiMConfig(backbone="resnet18", d=20), input_size=SIZE, weights="none").set_precision("bf16")
    det.fit(vad.load_images(paths, SIZE))
    assert det.precision == "bf16" and det.mean.dtype == det.cholesky.dtype == torch.float32


@pytest.mark.parametrize("name", ["efficientad", "autoencoder"])
def test_default_precision_is_fp32_on_a_cpu_that_reports_amx(name, dataset, tmp_path, monkeypatch):
    """A model never depends on CPU flags nobody chose: with an AMX Xeon's flags faked,
    nothing runs under autocast and training gives, bit for bit, the model it gives with
    an AVX2 CPU's flags. bf16 training happens when asked, and the .pt records it."""
    seen = []
    forward = torch.nn.Conv2d.forward  # every convolution: teacher, student, autoencoder

    def watched(self, x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, x)
    monkeypatch.setattr(torch.nn.Conv2d, "forward", watched)
    settings = [s for s in FAST[name] if not s.startswith("epochs")] + ["epochs=1"]

    def fit(**kwargs):
        return vad.fit(dataset, name, backbone="resnet18", weights="none", image_size=SIZE, device="cpu",
                       settings=settings, **kwargs)
    models = {}
    for cpu, flags in [("amx", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile"), ("avx2", "avx2 fma")]:
        monkeypatch.setattr(vad, "cpu_info", lambda: ("faked", frozenset(flags.split())))
        assert vad.cpu_has_bf16() == (cpu == "amx")
        models[cpu] = fit()
        assert models[cpu].precision == "fp32" and seen and not any(seen)
    for (k, a), b in zip(models["amx"].state_dict().items(), models["avx2"].state_dict().values()):
        assert torch.equal(a, b), k
    vad.save(models["amx"], tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["precision"] == "fp32"
    if name == "autoencoder":  # no frozen backbone: every autocast seen is training's
        seen.clear()
        det = fit(precision="bf16")
        assert det.precision == "bf16" and any(seen)
        vad.save(det, tmp_path / "bf16.pt")
        assert vad.load(tmp_path / "bf16.pt").precision == "bf16"
        det = fit(precision="fp16")  # autocast to fp16 with loss scaling
        assert det.precision == "fp16" and np.isfinite(float(det.threshold))


def test_precision_is_saved_and_can_be_overridden(dataset, tmp_path):
    det = fit_tiny("padim", dataset, precision="bf16")
    vad.save(det, tmp_path / "m.pt")
    assert vad.load(tmp_path / "m.pt").precision == "bf16"
    assert vad.load(tmp_path / "m.pt", precision="fp32").precision == "fp32"

# -----------------------------------------------------------------------------
# Backbones


def test_backbone_taps_have_documented_strides_and_channels():
    x = torch.rand(1, 3, 64, 64)
    for name, channels in vad.BACKBONES.items():
        feats = vad.FeatureExtractor(name, (1, 2, 3), weights="empty")(x)
        assert [f.shape[1] for f in feats] == list(channels)
        assert [f.shape[-1] for f in feats] == [16, 8, 4]  # strides 4, 8, 16
        odd = vad.FeatureExtractor(name, (1, 2, 3), weights="empty")
        assert odd.grids((61, 50)) == [tuple(f.shape[-2:]) for f in odd(torch.rand(1, 3, 61, 50))]


def test_backbone_is_truncated_after_deepest_layer():
    assert len(vad.FeatureExtractor("resnet18", (2,), weights="empty").stages) == 2
    names = {n for n, _ in vad.FeatureExtractor("wide_resnet50_2", (2, 3), weights="empty").named_modules()}
    assert not any("layer4" in n or "fc" in n for n in names)


def torchvision_taps(net, name, images):
    """The three tapped maps of a torchvision network, computed by torchvision's modules."""
    x = (images - torch.tensor(vad.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(vad.IMAGENET_STD).view(1, 3, 1, 1)
    if name == "mobilenet_v2":
        return [net.features[:4](x), net.features[:7](x), net.features[:14](x)]
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    taps = []
    for layer in (net.layer1, net.layer2, net.layer3):
        x = layer(x)
        taps.append(x)
    return taps


@pytest.mark.parametrize("name", list(vad.BACKBONES))
def test_backbones_give_torchvisions_features_bit_for_bit(name, tmp_path):
    """vad's own networks load a torchvision state dict (--weights PATH) and compute the
    same features, bit for bit, as torchvision's networks with it."""
    torch.manual_seed(0)
    net = torchvision.models.get_model(name).eval()
    for m in net.modules():  # batch norm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        reference = torchvision_taps(net, name, images)
    for layers in [(1, 2, 3), (2,)]:  # truncated after the deepest tap
        fe = vad.FeatureExtractor(name, layers, weights=str(tmp_path / "w.pth"))
        for ours, i in zip(fe(images), layers):
            assert torch.equal(ours, reference[i - 1])
    assert len(vad.FeatureExtractor(name, (2,), weights="empty").stages) == 2


def test_backbone_weights_files_that_do_not_fit(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(vad.VadError, match="does not fit mobilenet_v2: .* missing"):
        vad.FeatureExtractor("mobilenet_v2", (1, 2, 3), weights=str(tmp_path / "r18.pth"))
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")  # the same names, half as wide
    with pytest.raises(vad.VadError, match="does not fit wide_resnet50_2: size mismatch"):
        vad.FeatureExtractor("wide_resnet50_2", (1,), weights=str(tmp_path / "r50.pth"))
    with pytest.raises(vad.VadError, match="no such file"):
        vad.FeatureExtractor("resnet18", (1,), weights=str(tmp_path / "missing.pth"))
    (tmp_path / "{notes}.pth").write_text("not a state dict")  # braces in the name are just text
    with pytest.raises(vad.VadError, match=r"\{notes\}.pth: not a readable state dict \("):
        vad.FeatureExtractor("resnet18", (1,), weights=str(tmp_path / "{notes}.pth"))


def test_imagenet_weights_are_torchvisions_files():
    for name, url in vad.IMAGENET_URLS.items():
        assert url == torchvision.models.get_model_weights(name).IMAGENET1K_V1.url


def test_imagenet_weights_offline_gives_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(vad.VadError) as e:
        vad.FeatureExtractor("resnet18", (1, 2, 3), weights="imagenet")
    message = str(e.value)
    assert "--weights PATH" in message and "--weights none" in message and str(torch.hub.get_dir()) in message
    assert "resnet18-f37072fd.pth" in message and "\n" not in message


def test_imagenet_download_notice_goes_to_stderr(dataset, tmp_path, monkeypatch):
    """torch.hub announces a download on stdout; fit's stdout must hold only the model path."""
    state = torchvision.models.resnet18().state_dict()
    asked = []

    def download(url, *args, **kwargs):
        asked.append(url)
        sys.stdout.write(f'Downloading: "{url}" to somewhere\n')
        return state
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    r = cli("fit", "--model", "padim", "--data", dataset, "--out", tmp_path / "m.pt", "--backbone", "resnet18",
            "--weights", "imagenet", "--image-size", SIZE, "-s", "d=20")
    assert r.exit_code == 0, r.output
    assert asked == [vad.IMAGENET_URLS["resnet18"]]
    assert r.stdout == f"{tmp_path / 'm.pt'}\n" and "Downloading" in r.stderr

# -----------------------------------------------------------------------------
# Anomaly maps


def test_blur_and_upsample_matrices_match_scipy_and_torch():
    maps = torch.rand(2, 40, 37, dtype=torch.float64)
    for i in range(2):
        ours = vad.blur_matrix(40, 4.0) @ maps[i] @ vad.blur_matrix(37, 4.0).T
        ref = scipy.ndimage.gaussian_filter(maps[i].numpy(), 4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    small = torch.rand(3, 5, 7, dtype=torch.float64)
    ours = vad.upsample_matrix(5, 20) @ small @ vad.upsample_matrix(7, 24).T
    ref = torch.nn.functional.interpolate(small[:, None], size=(20, 24), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-12)


def test_upsample_and_blur_is_interpolate_then_gaussian_filter():
    patch = torch.rand(2, 16, 16)
    ours = vad.upsample_and_blur(patch, 64, 4.0).numpy()
    up = torch.nn.functional.interpolate(patch[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    for i in range(2):
        ref = scipy.ndimage.gaussian_filter(up[i].double().numpy(), 4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)

# -----------------------------------------------------------------------------
# Detectors (every registered one)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("name", list(vad.DETECTORS))
def test_detector_separates_and_localizes_defects(name, threads, fitted, dataset):
    """With 1 and 2 threads, on AVX2 and AVX-512 kernels, by a wide margin (measured:
    image AUROC 1.0, pixel AUROC >= 0.98, AUPRO >= 0.94 for each detector)."""
    det = fitted[name] if threads == FIXTURE_THREADS else fit_tiny(name, dataset)
    metrics = vad.evaluate(det, vad.read_dataset(dataset))
    assert metrics["image_auroc"] >= 0.9
    assert metrics["pixel_auroc"] >= 0.9
    assert metrics["aupro"] >= 0.8


@pytest.mark.parametrize("name", list(vad.DETECTORS))
def test_detector_scores_shapes_and_threshold_from_holdout(name, fitted, dataset):
    det = fitted[name]
    images = torch.stack([vad.read_image(p, SIZE) for p in vad.read_dataset(dataset).test[:3]])
    scores, maps = det.score(images)
    assert scores.shape == (3,) and maps.shape == (3, SIZE, SIZE)
    assert det.info["held_out"] == 2 and det.info["images"] == 18
    fit_idx, held = vad.split_holdout(20, 0.1, 0)
    held_scores, _ = det.score(torch.stack([vad.read_image(vad.read_dataset(dataset).train[i], SIZE) for i in held]))
    assert float(det.threshold) == pytest.approx(vad.threshold_from(held_scores), rel=1e-6)


def test_scores_agree_across_threads_and_cpu_kernels(fitted, dataset):
    """PaDiM and PatchCore, fitted and scored with 1 thread and torch's and oneDNN's AVX2
    kernels, give this session's scores to 1e-5 relative (measured: up to 1.2e-6). On
    an AVX-512 or AMX CPU the flags switch it to the AVX2 code paths; on an AVX2 CPU
    only the threads differ. (Training amplifies rounding: the trained detectors'
    scores agree less closely, README "Precision, CPUs and threads".)"""
    script = ("import json, sys, torch, vad; torch.set_num_threads(1); data = vad.read_dataset(sys.argv[1]); "
              "print(json.dumps({n: [r.score for r in vad.score_files(vad.fit(data.train, n, backbone='resnet18', "
              "weights='none', image_size=int(sys.argv[3]), device='cpu', settings=s), data.test, desc=None)] "
              "for n, s in json.loads(sys.argv[2]).items()}))")
    models = {n: FAST[n] for n in ("padim", "patchcore")}
    run = subprocess.run([sys.executable, "-c", script, str(dataset), json.dumps(models), str(SIZE)],
                         env=dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2"),
                         cwd=Path(vad.__file__).parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name, scores in json.loads(run.stdout).items():
        ours = [r.score for r in vad.score_files(fitted[name], vad.read_dataset(dataset).test, desc=None)]
        np.testing.assert_allclose(scores, ours, rtol=1e-5)

# -----------------------------------------------------------------------------
# PaDiM


def test_oas_shrinkage_against_a_per_position_numpy_reference():
    rng = np.random.default_rng(4)
    d = 6
    for n in (3, 8, 200):  # rank-deficient, barely full, plenty
        x = rng.normal(size=(5, n, d)) * rng.uniform(0.5, 3, d)  # 5 positions
        S = np.stack([np.cov(p, rowvar=False, bias=True) for p in x])  # maximum likelihood
        shrunk, rho = vad.oas_shrink(torch.from_numpy(S), n)
        for p in range(5):  # Chen et al. 2010, eq. 23, written out
            tr, tr2 = np.trace(S[p]), np.trace(S[p] @ S[p])
            r = min(1.0, ((1 - 2 / d) * tr2 + tr ** 2) / ((n + 1 - 2 / d) * (tr2 - tr ** 2 / d)))
            np.testing.assert_allclose(rho[p].item(), r, rtol=1e-12)
            np.testing.assert_allclose(shrunk[p].numpy(), (1 - r) * S[p] + r * tr / d * np.eye(d), rtol=1e-12)
            assert np.linalg.eigvalsh(shrunk[p].numpy()).min() > 0  # invertible even when n <= d
    assert rho.max() < 0.1  # with n = 200 >> d, almost the sample covariance
    same, rho = vad.oas_shrink(torch.eye(3, dtype=torch.float64)[None] * 2, 10)  # already a scaled identity
    assert torch.allclose(same, torch.eye(3, dtype=torch.float64) * 2) and rho.item() == 1


def test_max_train_fits_on_a_seeded_subset(dataset):
    a = fit_tiny("padim", dataset, max_train=6, holdout=0.34)
    b = fit_tiny("padim", dataset, max_train=6, holdout=0.34)
    assert a.info["images"] + a.info["held_out"] == 6 and torch.equal(a.mean, b.mean)
    c = fit_tiny("padim", dataset, max_train=6, holdout=0.34, seed=1)
    assert not torch.equal(a.mean, c.mean)  # another seed, another subset
    oas = vad.fit(dataset, "padim", backbone="resnet18", weights="none", image_size=SIZE, device="cpu",
                  max_train=6, holdout=0.34, settings=["d=40", "covariance=oas"])
    assert oas.config.covariance == "oas" and torch.isfinite(oas.cholesky).all()


def test_mahalanobis_matches_scipy():
    g = torch.Generator().manual_seed(0)
    P, d, B = 5, 4, 3
    A = torch.randn(P, d, d, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) + 0.1 * torch.eye(d, dtype=torch.float64)
    mean, x = torch.randn(P, d, generator=g, dtype=torch.float64), torch.randn(P, d, B, generator=g, dtype=torch.float64)
    ours = vad.mahalanobis(x, mean, torch.linalg.cholesky(cov)).numpy()
    for p in range(P):
        VI = np.linalg.inv(cov[p].numpy())
        for b in range(B):
            ref = scipy.spatial.distance.mahalanobis(x[p, :, b].numpy(), mean[p].numpy(), VI)
            assert ours[p, b] == pytest.approx(ref, rel=1e-10)


def test_padim_statistics_match_numpy(dataset):
    """Streaming fp64 sums over several batches give numpy's per-position mean and covariance."""
    paths = vad.read_dataset(dataset).train[:10]
    det = vad.PaDiM(vad.PaDiMConfig(backbone="resnet18", d=12), input_size=32, weights="none")
    det.fit(vad.load_images(paths, 32, batch_size=3))
    x = det.embed(torch.stack([vad.read_image(p, 32) for p in paths])).double().numpy()  # (N, d, h, w)
    N, d, h, w = x.shape
    x = x.reshape(N, d, h * w)
    L = det.cholesky.double()
    for p in (0, 17, h * w - 1):
        np.testing.assert_allclose(det.mean[p].numpy(), x[:, :, p].mean(0), rtol=1e-5, atol=1e-5)
        ref = np.cov(x[:, :, p], rowvar=False) + 0.01 * np.eye(d)
        np.testing.assert_allclose((L[p] @ L[p].T).numpy(), ref, rtol=1e-4, atol=1e-4)
    assert det.channels.tolist() == sorted(set(det.channels.tolist())) and len(det.channels) == 12


def seeded(cls, config, size):
    """A detector with the random-init backbone of seed 0: two of them see the same features."""
    torch.manual_seed(0)
    return cls(config, input_size=size, weights="none")


@pytest.mark.parametrize("n_old, n_new, covariance", [(3, 4, "sample"), (12, 8, "sample"), (12, 8, "oas")])
def test_padim_update_is_the_fit_on_the_union(dataset, n_old, n_new, covariance):
    """update(fit(A), B) = fit(A + B), with fewer images than d (7 < 12) and more (20):
    bit for bit when the batches split alike (the same fp32 products enter the same fp64
    sums in the same order), and numpy's mean and covariance of all the images when they
    do not."""
    paths = vad.read_dataset(dataset).train[: n_old + n_new]
    cfg = vad.PaDiMConfig(backbone="resnet18", d=12, covariance=covariance, updatable=True)
    union = seeded(vad.PaDiM, cfg, 32)
    union.fit(vad.load_images(paths, 32, batch_size=1))
    updated = seeded(vad.PaDiM, cfg, 32)
    updated.fit(vad.load_images(paths[:n_old], 32, batch_size=1))
    updated.update(vad.load_images(paths[n_old:], 32, batch_size=1))
    assert int(updated.stat_count) == n_old + n_new and torch.equal(updated.channels, union.channels)
    for name in ("stat_shift", "stat_sum", "stat_products", "mean", "cholesky"):  # the same sums, in the same order
        assert torch.equal(getattr(updated, name), getattr(union, name)), name

    other = seeded(vad.PaDiM, vad.PaDiMConfig(backbone="resnet18", d=12, updatable=True), 32)
    other.fit(vad.load_images(paths[:n_old], 32, batch_size=2))
    other.update(vad.load_images(paths[n_old:], 32, batch_size=3))
    x = other.embed(torch.stack([vad.read_image(p, 32) for p in paths])).double().flatten(2).numpy()  # (N, d, P)
    L = other.cholesky.double()
    for p in (0, 27, x.shape[2] - 1):
        np.testing.assert_allclose(other.mean[p].numpy(), x[:, :, p].mean(0), rtol=1e-5, atol=1e-5)
        ref = np.cov(x[:, :, p], rowvar=False) + 0.01 * np.eye(12)
        np.testing.assert_allclose((L[p] @ L[p].T).numpy(), ref, rtol=1e-4, atol=1e-4)


def numpy_padim(x, covariance, eps=0.01):
    """PaDiM's mean and regularized covariance of features x (N, d) written out in
    numpy: eq. 1's unbiased covariance, or Chen et al.'s OAS (eq. 23) of the ML one."""
    N, d = x.shape
    if covariance == "sample":
        return x.mean(0), np.cov(x, rowvar=False) + eps * np.eye(d)
    S = np.cov(x, rowvar=False, bias=True)
    tr, tr2 = np.trace(S), np.trace(S @ S)
    r = min(1.0, ((1 - 2 / d) * tr2 + tr ** 2) / ((N + 1 - 2 / d) * (tr2 - tr ** 2 / d)))
    return x.mean(0), (1 - r) * S + (r * tr / d + eps) * np.eye(d)


@pytest.mark.parametrize("n_old, n_new, covariance", [(3, 4, "oas"), (12, 8, "sample")])
def test_padim_update_without_kept_statistics_is_the_fit_on_the_union_to_fp32_rounding(dataset, n_old, n_new,
                                                                                       covariance):
    """A PaDiM fitted without updatable gives its sums back from its mean and Cholesky
    factors (and, with OAS, by undoing the shrinkage): update(fit(A), B) is numpy's
    statistics of A + B, and the fit on A + B to fp32 rounding."""
    paths = vad.read_dataset(dataset).train[: n_old + n_new]
    cfg = vad.PaDiMConfig(backbone="resnet18", d=12, covariance=covariance)
    union = seeded(vad.PaDiM, cfg, 32)
    union.fit(vad.load_images(paths, 32, batch_size=20))
    updated = seeded(vad.PaDiM, cfg, 32)
    updated.fit(vad.load_images(paths[:n_old], 32, batch_size=20))
    assert updated.stat_products.numel() == 0  # not kept: the file stays as small as before
    updated.info = {"images": n_old}  # as fit() records it
    assert vad.update_support(updated) == "to fp32 rounding"
    updated.update(vad.load_images(paths[n_old:], 32, batch_size=20))
    C, C_union = (m.cholesky.double() @ m.cholesky.double().transpose(1, 2) for m in (updated, union))
    scale = C_union.abs().amax((1, 2), keepdim=True)
    assert ((C - C_union).abs() / scale).max() < 2e-6  # measured: 4e-7 (fp32 rounding is 6e-8)
    torch.testing.assert_close(updated.mean, union.mean, rtol=1e-6, atol=1e-6 * float(union.mean.abs().max()))
    x = updated.embed(torch.stack([vad.read_image(p, 32) for p in paths])).double().flatten(2).numpy()  # (N, d, P)
    for p in (0, 27, x.shape[2] - 1):
        mean, cov = numpy_padim(x[:, :, p], covariance)
        np.testing.assert_allclose(updated.mean[p].numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(C[p].numpy(), cov, rtol=1e-4, atol=1e-4)


def test_padim_update_refuses_statistics_it_cannot_recover(dataset):
    paths = vad.read_dataset(dataset).train[:4]
    det = seeded(vad.PaDiM, vad.PaDiMConfig(backbone="resnet18", d=12, covariance="oas"), 32)
    det.fit(vad.load_images(paths, 32))
    with pytest.raises(vad.VadError, match="how many images"):  # no info: no count
        det.update(vad.load_images(paths, 32))
    det.info = {"images": 4}
    before = det.cholesky.clone()
    det.cholesky[5] = torch.eye(12) * 0.7  # shrunk all the way to a scaled identity: nothing left of S
    with pytest.raises(vad.VadError, match=r"OAS shrinkage is nearly total .* at 1 of 64 positions"):
        det.update(vad.load_images(paths, 32))
    assert vad.update_support(det) == "no"
    det.cholesky = before
    assert vad.update_support(det) == "to fp32 rounding"
    det.config.updatable = True
    assert vad.update_support(det) == "exact"

# -----------------------------------------------------------------------------
# PatchCore's memory bank: greedy coreset and exact nearest-neighbour search


def naive_greedy(x, n, start):
    """Greedy k-center on the full O(N^2) distance matrix."""
    D = scipy.spatial.distance.cdist(x, x, "sqeuclidean")
    picks, nearest = [start], D[start].copy()
    while len(picks) < n:
        picks.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, D[picks[-1]])
    return picks


def test_greedy_coreset_matches_naive_greedy():
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    picks = vad.greedy_coreset(x, 40, projection_dim=0, seed=5).tolist()
    assert picks == naive_greedy(x.numpy(), 40, start=picks[0])
    assert len(set(picks)) == 40
    assert picks == vad.greedy_coreset(x, 40, projection_dim=0, seed=5).tolist()


@pytest.mark.parametrize("frontier, batch", [(16, 5), (64, 1000), (5000, 3)])
def test_greedy_kcenter_frontier_and_pruning_are_exact(frontier, batch):
    """Small frontiers and batches force every path: frontier exhausted, periodic and
    pruned refreshes; a frontier larger than the data means no refresh after the first."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, (1000, 8)), rng.normal(5, 0.3, (500, 8))])  # uneven density
    picks = vad.greedy_kcenter(x, 150, start=7, frontier=frontier, batch=batch)
    assert picks.tolist() == naive_greedy(x, 150, start=7)


def test_greedy_kcenter_edge_sizes():
    x = np.random.default_rng(0).normal(size=(4, 3))
    assert sorted(vad.greedy_kcenter(x, 4, start=2).tolist()) == [0, 1, 2, 3]
    assert vad.greedy_kcenter(x[:1], 1, start=0).tolist() == [0]


def test_greedy_coreset_projection_is_seeded():
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(2))
    a = vad.greedy_coreset(x, 20, projection_dim=8, seed=0)
    assert torch.equal(a, vad.greedy_coreset(x, 20, projection_dim=8, seed=0))
    assert not torch.equal(a, vad.greedy_coreset(x, 20, projection_dim=8, seed=1))


def test_greedy_coreset_of_parts_is_the_coreset_of_their_concatenation():
    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(n, 40, generator=g) for n in (70, 1, 130)]
    whole = vad.greedy_coreset(torch.cat(parts), 25, projection_dim=8, seed=3)
    assert torch.equal(vad.greedy_coreset(parts, 25, projection_dim=8, seed=3), whole)
    det = vad.PatchCore(vad.PatchCoreConfig(backbone="resnet18", coreset_ratio=0.1, projection_dim=8),
                        input_size=SIZE, weights="none")
    assert torch.equal(det.coreset(parts, seed=3), torch.cat(parts)[vad.greedy_coreset(torch.cat(parts), 21, 8, 3)])


def test_nearest_neighbors_matches_cdist_in_small_chunks(monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, bank = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(80, 7, generator=g, dtype=torch.float64)
    monkeypatch.setattr(vad, "CHUNK_BYTES", 4 * 80 * 3)  # three query rows per block
    dist, idx = vad.nearest_neighbors(q, bank, k=4)
    ref = scipy.spatial.distance.cdist(q.numpy(), bank.numpy())
    np.testing.assert_array_equal(idx.numpy(), np.argsort(ref, 1)[:, :4])
    np.testing.assert_allclose(dist.numpy(), np.sort(ref, 1)[:, :4], rtol=1e-9)


def clustered(rng, n, d, centres=6, spread=0.6):
    """Rows around a few random centres: cells with real boundaries between them."""
    c = rng.normal(0, 2, (centres, d))
    return torch.tensor(c[rng.integers(0, centres, n)] + rng.normal(0, spread, (n, d)))


def test_voronoi_cells_put_every_row_in_its_nearest_centres_cell():
    rng = np.random.default_rng(4)
    bank = clustered(rng, 600, 10)
    order, centres, starts, radii = vad.voronoi_cells(bank, 12, seed=1)
    assert sorted(order.tolist()) == list(range(600)) and starts[0] == 0 and starts[-1] == 600
    assert len(centres) == len(radii) == len(starts) - 1 <= 12 and bool((starts.diff() > 0).all())
    cell = np.repeat(np.arange(len(centres)), starts.diff().numpy())
    rows = bank[order].numpy()
    to_centres = scipy.spatial.distance.cdist(rows, centres.numpy())
    np.testing.assert_array_equal(to_centres.argmin(1), cell)
    np.testing.assert_allclose(radii.numpy(), [to_centres[cell == j, j].max() for j in range(len(centres))],
                               rtol=1e-6)
    again = vad.voronoi_cells(bank, 12, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(again, (order, centres, starts, radii)))


@pytest.mark.parametrize("probe, cells", [(1, 16), (2, 16), (3, 40), (100, 16), (1, 1)])
def test_cell_search_is_the_exhaustive_search(monkeypatch, probe, cells):
    rng = np.random.default_rng(probe + cells)
    bank, queries = clustered(rng, 800, 12), clustered(rng, 300, 12, spread=1.5)
    monkeypatch.setattr(vad, "CHUNK_BYTES", 16 * cells * 70)  # blocks of about 70 queries
    order, centres, starts, radii = vad.voronoi_cells(bank, cells)
    bank = bank[order]
    reference = scipy.spatial.distance.cdist(queries.numpy(), bank.numpy())
    if probe == 1 and cells > 1:  # the first visits alone would miss neighbours: the bounds must add cells
        nearest_centre = scipy.spatial.distance.cdist(queries.numpy(), centres.numpy()).argmin(1)
        cell = np.repeat(np.arange(len(centres)), starts.diff().numpy())
        assert (cell[reference.argmin(1)] != nearest_centre).mean() > 0.05
    d, i = vad.cell_search(queries, bank, centres, starts, radii, probe)
    np.testing.assert_array_equal(i[:, 0].numpy(), reference.argmin(1))
    np.testing.assert_allclose(d[:, 0].numpy(), reference.min(1), rtol=1e-12)


def test_cell_search_on_a_bank_of_repeated_rows():
    """Flat images give banks of identical patches: duplicate centres must not survive
    (their cells would be empty), and every query still gets its nearest row."""
    bank = torch.cat([torch.zeros(50, 4), torch.ones(30, 4), torch.full((1, 4), 5.0)]).double()
    order, centres, starts, radii = vad.voronoi_cells(bank, 9)
    assert len(centres) <= 3 and bool((starts.diff() > 0).all()) and float(radii.max()) == 0
    queries = torch.tensor([[0.1] * 4, [0.9] * 4, [4.0] * 4, [0.5] * 4], dtype=torch.float64)
    d, i = vad.cell_search(queries, bank[order], centres, starts, radii)
    reference = scipy.spatial.distance.cdist(queries.numpy(), bank[order].numpy())
    np.testing.assert_allclose(d[:, 0].numpy(), reference.min(1), rtol=1e-12)
    np.testing.assert_array_equal(reference[np.arange(4), i[:, 0].numpy()], reference.min(1))


def test_cell_search_fp32_agrees_with_fp64_on_centred_data():
    rng = np.random.default_rng(9)
    bank, queries = clustered(rng, 2000, 64) + 30, clustered(rng, 500, 64, spread=1.2) + 30  # far from 0
    origin = bank.mean(0)
    bank, queries = (bank - origin).float(), (queries - origin).float()
    order, centres, starts, radii = vad.voronoi_cells(bank, 45)
    bank = bank[order]
    reference = scipy.spatial.distance.cdist(queries.double().numpy(), bank.double().numpy())
    d, i = vad.cell_search(queries, bank, centres, starts, radii, 1)
    np.testing.assert_array_equal(i[:, 0].numpy(), reference.argmin(1))
    np.testing.assert_allclose(d[:, 0].numpy(), reference.min(1), rtol=1e-5)

# -----------------------------------------------------------------------------
# PatchCore


def test_patchcore_image_score_is_eq7(fitted, dataset):
    """Image score = (1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* - m|) * s*, naively."""
    det = fitted["patchcore"]
    images = torch.stack([vad.read_image(p, SIZE) for p in vad.read_dataset(dataset).test[-3:]])
    scores, _ = det.score(images)
    bank = (det.memory_bank + det.bank_origin).double().numpy()  # the bank is stored centred
    feats = det.embed(images).permute(0, 2, 3, 1).double().numpy()
    for i in range(len(images)):
        patches = feats[i].reshape(-1, bank.shape[1])
        D = scipy.spatial.distance.cdist(patches, bank)
        worst = D.min(1).argmax()
        s_star, m_star = D[worst].min(), D[worst].argmin()
        support = np.argsort(scipy.spatial.distance.cdist(bank[m_star][None], bank)[0])[:det.config.num_neighbors]
        weight = 1 - np.exp(s_star) / np.exp(D[worst, support]).sum()
        assert float(scores[i]) == pytest.approx(weight * s_star, rel=1e-4)


def test_patchcore_coreset_ratio_sets_bank_size(dataset):
    paths = vad.read_dataset(dataset).train[:4]
    cfg = vad.PatchCoreConfig(backbone="resnet18", coreset_ratio=0.25)
    det = vad.PatchCore(cfg, input_size=SIZE, weights="none")
    det.fit(vad.load_images(paths, SIZE))
    assert len(det.memory_bank) == 4 * 8 * 8 // 4  # 4 images of an 8x8 layer-2 grid, 25%


@pytest.mark.parametrize("budget", ["BANK_BYTES", "PART_ROWS"])
def test_patchcore_bank_budget_gives_a_union_of_coresets(budget, dataset, monkeypatch):
    """Over the byte budget, or over PART_ROWS patches (fit linear in the images, issue
    22), the bank is thinned part by part: each part's coreset is exactly the greedy
    coreset of those patches (checked against greedy_coreset)."""
    paths = vad.read_dataset(dataset).train[:6]
    det = vad.PatchCore(vad.PatchCoreConfig(backbone="resnet18", coreset_ratio=0.1), input_size=SIZE, weights="none")
    batches = list(vad.load_images(paths, SIZE, batch_size=1))
    patches = [det.embed(b).permute(0, 2, 3, 1).flatten(0, 2) for b in batches]
    per_batch = patches[0].numel() * 4 if budget == "BANK_BYTES" else len(patches[0])
    monkeypatch.setattr(vad, budget, per_batch * 2 - 1)  # thin after every 2 batches
    det.fit(batches)
    expected = [p[vad.greedy_coreset(p, math.ceil(0.1 * len(p)), 128, seed)]
                for seed, p in enumerate([torch.cat(patches[0:2]), torch.cat(patches[2:4]), torch.cat(patches[4:6])])]
    expected = torch.cat(expected)
    torch.testing.assert_close(det.bank_origin, expected.mean(0))
    stored = det.memory_bank + det.bank_origin  # centred and grouped by cell: the same rows, reordered
    gap, match = torch.cdist(stored, expected, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert sorted(match.tolist()) == list(range(len(expected))) and float(gap.max()) < 1e-5


def bank_as_fitted(det):
    """PatchCore's bank rows in the order fit made them, uncentred."""
    rows = torch.empty_like(det.memory_bank)
    rows[det.bank_order] = det.memory_bank
    return rows + det.bank_origin


def test_patchcore_update_keeping_every_patch_is_the_fit_on_the_union(dataset):
    paths = vad.read_dataset(dataset).train[:6]
    cfg = vad.PatchCoreConfig(backbone="resnet18", coreset_ratio=1.0)
    union = seeded(vad.PatchCore, cfg, SIZE)
    union.fit(vad.load_images(paths, SIZE, batch_size=2))
    updated = seeded(vad.PatchCore, cfg, SIZE)
    updated.fit(vad.load_images(paths[:3], SIZE, batch_size=2))
    updated.update(vad.load_images(paths[3:], SIZE, batch_size=2))
    images = torch.stack([vad.read_image(p, SIZE) for p in paths])
    every_patch = union.embed(images).permute(0, 2, 3, 1).flatten(0, 2)  # the reference: all rows, in image order
    for det in (union, updated):  # the same rows in the same order, to the fp32 rounding of centring
        torch.testing.assert_close(bank_as_fitted(det), every_patch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(updated.bank_origin, union.bank_origin, rtol=1e-5, atol=1e-6)
    tests = torch.stack([vad.read_image(p, SIZE) for p in vad.read_dataset(dataset).test])
    s1, m1 = union.score(tests)
    s2, m2 = updated.score(tests)
    torch.testing.assert_close(s2, s1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m2, m1, rtol=1e-4, atol=1e-4)


def test_patchcore_update_goes_on_with_the_union_of_coresets(dataset, monkeypatch):
    """With the budget closing a part where the old images end, update(fit(A), B) is the
    fit on A + B: the coreset of A's patches (seed 0), then of B's (seed 1), checked
    against greedy_coreset. The bank grows by the new parts' coresets only, and no part
    holds more raw patches than the budget and a batch."""
    paths = vad.read_dataset(dataset).train[:9]
    cfg = vad.PatchCoreConfig(backbone="resnet18", coreset_ratio=0.1)
    ref = seeded(vad.PatchCore, cfg, SIZE)
    patches = [ref.embed(vad.read_image(p, SIZE)[None]).permute(0, 2, 3, 1).flatten(0, 2) for p in paths]
    per_image = patches[0].numel() * 4
    monkeypatch.setattr(vad, "BANK_BYTES", 3 * per_image - 1)  # a part every 3 images
    union = seeded(vad.PatchCore, cfg, SIZE)
    union.fit(vad.load_images(paths[:6], SIZE, batch_size=1))
    old = seeded(vad.PatchCore, cfg, SIZE)
    old.fit(vad.load_images(paths[:3], SIZE, batch_size=1))
    K = len(old.memory_bank)
    old.update(vad.load_images(paths[3:6], SIZE, batch_size=1))
    parts = [torch.cat(patches[0:3]), torch.cat(patches[3:6])]
    expected = torch.cat([p[vad.greedy_coreset(p, math.ceil(0.1 * len(p)), 128, seed)] for seed, p in enumerate(parts)])
    for det in (union, old):
        assert int(det.bank_parts) == 2
        torch.testing.assert_close(bank_as_fitted(det), expected, rtol=1e-5, atol=1e-5)
    assert len(old.memory_bank) - K == math.ceil(0.1 * len(parts[1]))

    seen = []  # bytes of raw patches each coreset call holds
    coreset = vad.PatchCore.coreset
    monkeypatch.setattr(vad.PatchCore, "coreset", lambda self, raw, seed: seen.append(
        sum(r.numel() * 4 for r in raw)) or coreset(self, raw, seed))
    monkeypatch.setattr(vad, "BANK_BYTES", 2 * per_image - 1)
    K = len(old.memory_bank)
    old.update(vad.load_images(paths[6:9], SIZE, batch_size=1))  # two parts: 2 images, then 1
    assert seen == [2 * per_image, per_image] and int(old.bank_parts) == 4
    n = len(patches[0])
    assert len(old.memory_bank) - K == math.ceil(0.1 * 2 * n) + math.ceil(0.1 * n) <= math.ceil(0.1 * 3 * n) + 1

# -----------------------------------------------------------------------------
# Detectors that train: augmentation, EfficientAD


def test_augment_is_seeded_and_exact_where_it_can_be():
    x = torch.rand(6, 3, 16, 16)
    a = vad.augment(x, torch.Generator().manual_seed(1), rotate=10, flip=True, jitter=0.1)
    assert torch.equal(a, vad.augment(x, torch.Generator().manual_seed(1), rotate=10, flip=True, jitter=0.1))
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert torch.equal(vad.augment(x, torch.Generator().manual_seed(1)), x)  # nothing asked, nothing done
    flipped = vad.augment(x, torch.Generator().manual_seed(2), flip=True)
    for i in range(6):  # each image is one of its four flips, exactly
        assert any(torch.equal(flipped[i], x[i].flip(dims)) if dims else torch.equal(flipped[i], x[i])
                   for dims in [(), (2,), (1,), (1, 2)])


def test_hard_feature_loss_counts_only_the_top_errors():
    det = vad.EfficientAD(vad.EfficientADConfig(backbone="resnet18", hard_quantile=0.9), SIZE, weights="none")
    g = torch.Generator().manual_seed(0)
    t, p = [torch.randn(2, 4, 5, 5, generator=g)], [torch.randn(2, 4, 5, 5, generator=g)]
    e = ((t[0] - p[0]) ** 2).flatten().numpy()
    kth = np.sort(e)[int(np.ceil(0.9 * e.size)) - 1]
    assert float(det.loss(t, p)) == pytest.approx(e[e >= kth].mean(), rel=1e-6)
    det.config.hard_quantile = 0.0
    assert float(det.loss(t, p)) == pytest.approx(e.mean(), rel=1e-6)


def test_efficientad_teacher_normalization_from_training_images(fitted, dataset):
    det = fitted["efficientad"]
    fit_idx, _ = vad.split_holdout(20, 0.1, 0)
    images = torch.stack([vad.read_image(vad.read_dataset(dataset).train[i], SIZE) for i in fit_idx])
    images = (images * 255).round() / 255  # the training images are kept as bytes
    for f, m, s in zip(det.teacher(images), det.teacher_mean.split(det.teacher.channels),
                       det.teacher_std.split(det.teacher.channels)):
        f = f.double().transpose(0, 1).flatten(1).numpy()  # (C, N*h*w)
        np.testing.assert_allclose(m.numpy(), f.mean(1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.numpy(), f.std(1), rtol=1e-4, atol=1e-5)


def test_epochs_option_reaches_the_trained_detectors(dataset, tmp_path):
    r = cli("fit", "--model", "autoencoder", "--data", dataset, "--out", tmp_path / "ae.pt", "--epochs", 2, *TINY)
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "ae.pt", weights_only=True)["config"]["epochs"] == 2
    r = cli("bench", "--model", "padim", "--model", "autoencoder", "--data", dataset, "--epochs", 1, *TINY,
            "-s", "padim.d=30", "-s", "top_k=5")
    assert r.exit_code == 0, r.output
    assert "| tiles | autoencoder | torch | - |" in r.stdout
    r = cli("bench", "--model", "padim", "--data", dataset, *TINY, "-s", "top_k=5")
    assert r.exit_code == 2 and "no such setting for padim" in r.stderr

# -----------------------------------------------------------------------------
# Autoencoder and SSIM


def reference_ssim(x, y):
    """SSIM map of two (H, W) arrays with scipy's Gaussian filter (Wang et al. 2004)."""
    def filt(z):
        return scipy.ndimage.gaussian_filter(z, 1.5, mode="mirror", truncate=5 / 1.5)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def test_ssim_map_matches_scipy_reference():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 24, 30))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    ours = vad.ssim_map(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for b in range(2):
        ref = np.mean([reference_ssim(x[b, c], y[b, c]) for c in range(3)], 0)
        np.testing.assert_allclose(ours[b], ref, atol=1e-6)
    assert torch.allclose(vad.ssim_map(torch.from_numpy(x), torch.from_numpy(x)), torch.ones(2, 24, 30, dtype=torch.float64))

# -----------------------------------------------------------------------------
# The detector registry and its settings


def test_settings_are_validated():
    assert vad.make_config("patchcore", ["coreset_ratio=0.05", "layers=2,3", "embed_dim=64"]).embed_dim == 64
    assert vad.make_config("patchcore", ["embed_dim=none"]).embed_dim is None  # an optional int
    assert vad.make_config("padim", ["d=20"]).d == 20 and vad.make_config("padim").d == 100
    assert vad.make_config("padim", ["layers=3,1"]).layers == (1, 3)
    with pytest.raises(vad.VadError, match="layers must be"):
        vad.make_config("padim", ["layers=4"])
    with pytest.raises(vad.VadError, match="coreset_ratio=, "):
        vad.make_config("patchcore", ["bogus=1"])
    with pytest.raises(vad.VadError, match="expected int"):
        vad.make_config("patchcore", ["num_neighbors=many"])
    with pytest.raises(vad.VadError, match=r"\(0, 1\]"):
        vad.make_config("patchcore", ["coreset_ratio=0"])

# -----------------------------------------------------------------------------
# Model files


@pytest.mark.parametrize("name", list(vad.DETECTORS))
def test_save_load_scores_identically(name, fitted, dataset, tmp_path):
    det = fitted[name]
    vad.save(det, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # plain tensors and containers only
    assert raw["format"] == "vad-model" and raw["detector"] == name and raw["image_size"] == [SIZE, SIZE]
    loaded = vad.load(tmp_path / "m.pt")
    images = torch.stack([vad.read_image(p, SIZE) for p in vad.read_dataset(dataset).test])
    s1, m1 = det.score(images)
    s2, m2 = loaded.score(images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert float(loaded.threshold) == float(det.threshold) and loaded.config == det.config


def test_refuses_other_format_version_and_tampering(fitted, tmp_path):
    vad.save(fitted["patchcore"], tmp_path / "m.pt")
    checkpoint = torch.load(tmp_path / "m.pt", weights_only=True)
    checkpoint["format_version"] = vad.FORMAT_VERSION + 1
    torch.save(checkpoint, tmp_path / "future.pt")
    with pytest.raises(vad.VadError, match="format version"):
        vad.load(tmp_path / "future.pt")
    checkpoint["format_version"] = vad.FORMAT_VERSION
    checkpoint["config"]["num_neighbors"] = 3
    torch.save(checkpoint, tmp_path / "tampered_config.pt")
    with pytest.raises(vad.VadError, match="checksum"):
        vad.load(tmp_path / "tampered_config.pt")
    checkpoint["config"]["num_neighbors"] = 9
    checkpoint["state_dict"]["memory_bank"][0, 0] += 1.0
    torch.save(checkpoint, tmp_path / "tampered.pt")
    with pytest.raises(vad.VadError, match="checksum"):
        vad.load(tmp_path / "tampered.pt")
    del checkpoint["state_dict"]["memory_bank"]
    torch.save(checkpoint, tmp_path / "missing_tensor.pt")
    with pytest.raises(vad.VadError, match="do not match a patchcore model \\(memory_bank"):  # before the checksum
        vad.load(tmp_path / "missing_tensor.pt")

# -----------------------------------------------------------------------------
# Framing and image I/O: modes, masks, data sets, aspect ratio, tiles, stitching


def test_read_image_modes(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((10, 10), 128, np.uint8)).save(grey)
    x = vad.read_image(grey, 8)
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.full_like(x, 128 / 255))

    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([np.full((6, 6), v, np.uint8) for v in (255, 0, 0, 7)])).save(rgba)
    assert torch.allclose(vad.read_image(rgba, 4)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))

    palette = tmp_path / "palette.png"
    Image.fromarray(np.full((6, 6), 255, np.uint8)).convert("RGB").convert("P").save(palette)
    assert torch.allclose(vad.read_image(palette, 4), torch.ones(3, 4, 4))

    deep = tmp_path / "deep.png"  # 16-bit: scaled from its full range, not clipped at 255
    Image.fromarray(np.full((6, 6), 30000, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    assert torch.allclose(vad.read_image(deep, 4), torch.full((3, 4, 4), 30000 / 65535), atol=1e-6)


def test_read_image_applies_exif_orientation(tmp_path):
    image = np.zeros((8, 16), np.uint8)
    image[:, 8:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(image).save(path, exif=exif, quality=95)
    x = vad.read_image(path, 16)[0]
    assert x[:4].mean() < 0.2 and x[-4:].mean() > 0.8  # black now on top


def test_read_mask_any_nonzero_is_defect(tmp_path):
    path = tmp_path / "m.png"
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 1  # a mask stored as 0/1, not 0/255
    Image.fromarray(mask).save(path)
    m = vad.read_mask(path, 16)
    assert m.dtype == torch.bool and m.sum() == 16 and m[4:8, 4:8].all()


def test_read_dataset_layouts(tmp_path, dataset):
    ds = vad.read_dataset(dataset)
    assert len(ds.train) == 20 and ds.labels.count(0) == 6 and ds.labels.count(1) == 6
    assert all((m is None) == (y == 0) for m, y in zip(ds.masks, ds.labels))
    plain = tmp_path / "plain"
    save_png(np.zeros((4, 4, 3)), plain / "a" / "x.png")
    save_png(np.zeros((4, 4, 3)), plain / "y.jpg")
    (plain / "notes.txt").write_text("not an image")
    assert [p.name for p in vad.read_dataset(plain).train] == ["x.png", "y.jpg"]
    with pytest.raises(vad.VadError, match="no such folder"):
        vad.read_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(vad.VadError, match="no images"):
        vad.read_dataset(tmp_path / "empty")


def test_parse_size():
    assert vad.parse_size("256") == (256, 256) and vad.parse_size(300) == (300, 300)
    assert vad.parse_size("640x256") == (640, 256) and vad.parse_size("native") is None
    for bad in ("0", "64x", "axb", "16x64", "1x2x3"):
        with pytest.raises(vad.VadError, match="--image-size"):
            vad.parse_size(bad)
    with pytest.raises(vad.VadError, match="needs --tile"):
        vad.Framing(None)


def test_placement_hand_computed():
    # A 100 x 200 image into a 64 x 64 frame. pad: scale min(0.64, 0.32) -> 32 x 64, centred
    # vertically at row 16. crop: scale max(...) = 0.64 -> 64 x 128, 32 columns cut each side.
    assert vad.placement((100, 200), (64, 64), "fit") == (64, 64, 0, 0)
    assert vad.placement((100, 200), (64, 64), "pad") == (32, 64, 16, 0)
    assert vad.placement((100, 200), (64, 64), "crop") == (64, 128, 0, -32)
    assert vad.valid_box((100, 200), (64, 64), "pad") == (16, 0, 48, 64)
    assert vad.valid_box((100, 200), (64, 64), "crop") == (0, 0, 64, 64)


def test_frame_image_pad_letterboxes_with_mean_colour_and_crop_cuts(tmp_path):
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100] = 255  # left half white: crop must cut equal parts off both sides
    save_png(image, tmp_path / "wide.png")
    x, source = vad.frame_image(tmp_path / "wide.png", vad.Framing((64, 64), "pad"))
    x = torch.from_numpy(x)
    assert source == (100, 200) and x.shape == (3, 64, 64)
    mean = torch.tensor(vad.IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(x[:, :16], mean.expand(3, 16, 64)) and torch.allclose(x[:, 48:], mean.expand(3, 16, 64))
    assert torch.allclose(x[:, 20:44, :30], torch.ones(3, 24, 30)) and torch.allclose(x[:, 20:44, 34:], torch.zeros(3, 24, 30))
    x = torch.from_numpy(vad.frame_image(tmp_path / "wide.png", vad.Framing((64, 64), "crop"))[0])
    assert torch.allclose(x[:, :, :30], torch.ones(3, 64, 30)) and torch.allclose(x[:, :, 34:], torch.zeros(3, 64, 30))
    mask = vad.read_mask(tmp_path / "wide.png", vad.Framing((64, 64), "pad"))
    assert mask[16:48, :32].all() and not mask[:16].any() and not mask[16:48, 33:].any()


def test_tile_starts_cover_evenly_with_at_least_the_overlap():
    assert vad.tile_starts(640, 256, 0.25) == [0, 192, 384]  # ceil(384 / 192) + 1 = 3 tiles
    assert vad.tile_starts(200, 256, 0.25) == [0] and vad.tile_starts(256, 256, 0.5) == [0]
    for length, tile, overlap in [(1000, 64, 0.0), (1000, 64, 0.5), (333, 100, 0.3), (65, 64, 0.9)]:
        s = vad.tile_starts(length, tile, overlap)
        assert s[0] == 0 and s[-1] + tile == length  # the whole axis is covered
        assert max(np.diff(s)) <= tile * (1 - overlap) + 0.5


def test_stitcher_blends_overlapping_tiles_by_their_window_weights():
    T, w = 8, vad.blend_window(8).double()
    s = vad.Stitcher((8, 12), T, 2)
    s.add(torch.full((T, T), 1.0), (0, 0))
    assert not s.complete
    s.add(torch.full((T, T), 3.0), (0, 4))
    assert s.complete
    out = s.result()
    assert out.shape == (8, 12)
    for x in range(12):  # both tiles span every row alike, so each column is a 1-D weighted mean
        a, b = (w[x] if x < 8 else 0.0), (w[x - 4] if x >= 4 else 0.0)
        assert torch.allclose(out[:, x].double(), torch.full((8,), float((1 * a + 3 * b) / (a + b)), dtype=torch.float64))
    assert out[0, 0] == 1 and out[0, 11] == 3 and 1 < out[0, 6] < 3
    whole = torch.rand(5, 7)
    untiled = vad.Stitcher((5, 7), None, 1)
    untiled.add(whole, (0, 0))
    assert untiled.complete and torch.equal(untiled.result(), whole)


class PixelDetector(vad.Detector):
    """A stand-in detector whose map is the input's first channel: stitching must give
    back the framed image itself, whatever the tiling."""
    name = "pixels"

    def score(self, images):
        maps = images[:, 0].clone()
        return maps.amax((1, 2)), maps


@pytest.mark.parametrize("frame,tile,overlap", [((80, 100), 32, 0.5), ((80, 100), 48, 0.0), ((40, 20), 32, 0.25)])
def test_tiles_stitch_back_to_the_frame(tmp_path, frame, tile, overlap):
    rng = np.random.default_rng(0)
    save_png(rng.uniform(0, 255, (*frame, 3)), tmp_path / "a.png")
    det = PixelDetector(None, tile)
    det.framing = vad.Framing(frame, "fit", tile, overlap)
    r = next(vad.score_files(det, [tmp_path / "a.png"], batch_size=3))
    expected = vad.read_image(tmp_path / "a.png", frame)[0].numpy()
    np.testing.assert_allclose(r.anomaly_map, expected, atol=1e-6)
    assert r.score == pytest.approx(expected.max()) and r.source_size == frame


def test_letterbox_is_never_scored(tmp_path):
    save_png(np.full((30, 90, 3), 100.0), tmp_path / "a.png")
    det = PixelDetector(None, 60)
    det.framing = vad.Framing((60, 60), "pad")
    r = next(vad.score_files(det, [tmp_path / "a.png"]))
    t, l, b, r_ = vad.valid_box((30, 90), (60, 60), "pad")
    assert (t, l, b, r_) == (20, 0, 40, 60)
    assert np.isnan(r.anomaly_map[:t]).all() and np.isnan(r.anomaly_map[b:]).all()
    assert r.score == pytest.approx(100 / 255)  # the mean-colour border (0.485 > 0.39) does not count
    back = vad.map_to_source(r.anomaly_map, (30, 90), det.framing)
    assert back.shape == (30, 90) and np.allclose(back, 100 / 255)


def test_map_to_source_crop_marks_the_cut_off_parts():
    framing = vad.Framing((64, 64), "crop")
    back = vad.map_to_source(np.ones((64, 64), np.float32), (100, 200), framing)
    # scale 0.64: the frame's 64 columns are source columns 50..150
    assert back.shape == (100, 200) and np.isnan(back[:, :50]).all() and np.isnan(back[:, 150:]).all()
    assert np.allclose(back[:, 50:150], 1)


def strip(rng, H, W):
    """A tall grey texture of vertical stripes with noise."""
    xx = np.arange(W)[None]
    return 128 + 25 * np.sin(2 * np.pi * xx / 16 + rng.uniform(0, 6.3)) + rng.normal(0, 6, (H, W))


@pytest.fixture(scope="session")
def strips(tmp_path_factory):
    """512 x 64 strips; defects are 1-pixel-high dark scratches, which squashing the
    strip to 64 x 64 thins to an eighth of a pixel of an eighth of the contrast (about
    the noise): the KolektorSDD situation."""
    root, rng = tmp_path_factory.mktemp("strips"), np.random.default_rng(0)
    for i in range(20):
        save_png(strip(rng, 512, 64), root / "train" / "good" / f"{i:03d}.png")
    for i in range(8):
        save_png(strip(rng, 512, 64), root / "test" / "good" / f"{i:03d}.png")
        a, m = strip(rng, 512, 64), np.zeros((512, 64))
        y, x = rng.integers(32, 480), rng.integers(4, 28)
        a[y, x:x + 32], m[y, x:x + 32] = 70, 255
        save_png(a, root / "test" / "scratch" / f"{i:03d}.png")
        save_png(m, root / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return vad.read_dataset(root)


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_tiling_finds_thin_defects_that_squashing_hides(strips, model):
    settings = ["d=40"] if model == "padim" else []
    common = dict(backbone="resnet18", weights="none", device="cpu", settings=settings)
    plain = vad.evaluate(vad.fit(strips.train, model, image_size=64, **common), strips)
    tiled_det = vad.fit(strips.train, model, image_size="native", tile=64, **common)
    tiled = vad.evaluate(tiled_det, strips)
    assert tiled["image_auroc"] >= 0.95 and tiled["pixel_auroc"] >= 0.95
    assert plain["image_auroc"] <= tiled["image_auroc"] - 0.2  # measured: 0.73 / 0.61 against 1.0
    r = next(vad.score_files(tiled_det, strips.test[-1:]))
    assert r.anomaly_map.shape == (512, 64) and r.verdict == "anomalous"


def test_cli_tiled_model_writes_maps_at_the_image_size(strips, tmp_path):
    model = tmp_path / "strips.pt"
    r = cli("fit", "--model", "patchcore", "--data", strips.root, "--out", model, "--backbone", "resnet18",
            "--weights", "none", "--image-size", "256x32", "--resize", "pad", "--tile", "32", "-q")
    assert r.exit_code == 0, r.output
    framing = torch.load(model, weights_only=True)["framing"]
    assert framing["size"] == (256, 32) and framing["resize"] == "pad" and framing["tile"] == 32
    r = cli("score", model, strips.test[0], "--maps", tmp_path / "m", "--heatmaps", tmp_path / "h", "--json", "-q")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert np.load(record["map"]).shape == (512, 64) and Image.open(record["heatmap"]).size == (64, 512)

# -----------------------------------------------------------------------------
# API: held-out split and threshold; metrics against references


def test_split_holdout_is_seeded_and_disjoint():
    fit_idx, held = vad.split_holdout(209, 0.1, seed=3)
    assert len(held) == 21 and not set(fit_idx) & set(held) and len(fit_idx) + len(held) == 209
    assert (fit_idx, held) == vad.split_holdout(209, 0.1, seed=3)
    assert held != vad.split_holdout(209, 0.1, seed=4)[1]
    assert len(vad.split_holdout(3, 0.1, 0)[1]) == 1  # at least one image calibrates


def held_out_values(det, paths):
    """Score, map maximum and map median of each image, as score_files gives them."""
    scored = list(vad.score_files(det, paths, desc=None))
    return [r.score for r in scored], [np.nanmax(r.anomaly_map) for r in scored], \
        [np.nanmedian(r.anomaly_map) for r in scored]


def test_update_derives_the_thresholds_from_stored_and_new_held_out_images(dataset, fitted):
    train = vad.read_dataset(dataset).train
    old, new = train[:10], train[10:16]
    det = fit_tiny("patchcore", old, holdout=0.2)
    held = [old[i] for i in vad.split_holdout(10, 0.2, 0)[1]]
    scores, maxima, medians = held_out_values(det, held)  # what fit should have kept
    assert det.held_out_scores.tolist() == scores and det.held_out_maxima.tolist() == maxima
    assert float(det.threshold) == pytest.approx(vad.threshold_from(scores), rel=1e-6)
    vad.update(det, new)
    held_new = [new[i] for i in vad.split_holdout(6, 0.2, 0)[1]]  # the model's own fraction and seed
    s, m, med = held_out_values(det, held_new)  # scored by the updated model
    assert det.held_out_scores.tolist() == scores + s
    assert float(det.threshold) == pytest.approx(vad.threshold_from(scores + s), rel=1e-6)
    assert float(det.pixel_threshold) == pytest.approx(vad.threshold_from(maxima + m), rel=1e-6)
    assert float(det.map_low) == pytest.approx(float(np.median(medians + med)), rel=1e-6)
    assert (det.info["images"], det.info["held_out"], det.info["added"]) == (8 + 5, 2 + 1, 6)
    with pytest.raises(vad.VadError, match="cannot be updated"):
        vad.update(fitted["efficientad"], new)


@pytest.mark.parametrize("where", ["fitted part", "held-out part"])
def test_update_that_fails_leaves_the_detector_as_it_was(dataset, tmp_path, where):
    train = vad.read_dataset(dataset).train
    det = fit_tiny("patchcore", train[:8])
    before = {k: v.clone() for k, v in det.state_dict().items()}
    new = train[8:12]
    held = vad.split_holdout(4, 0.1, 0)[1][0]
    bad = held if where == "held-out part" else (held + 1) % 4
    new[bad] = tmp_path / "truncated.png"
    new[bad].write_bytes(train[0].read_bytes()[:100])
    with pytest.raises(vad.VadError, match="truncated.png"):
        vad.update(det, new)
    after = det.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_verdict_fails_closed_and_large_inputs_come_in_smaller_batches(fitted, dataset, monkeypatch):
    assert [vad.Scored("x", s, 1.0).verdict for s in (0.5, 1.0, 1.5, float("nan"))] == \
        ["ok", "ok", "anomalous", "anomalous"]  # NaN is never ok
    sizes, detector = [], fitted["padim"]
    monkeypatch.setattr(vad, "MAX_BATCH_PIXELS", 3 * SIZE * SIZE)  # room for 3 inputs of this model
    score = detector.score
    monkeypatch.setattr(detector, "score", lambda x: sizes.append(len(x)) or score(x))
    results = list(vad.score_files(detector, vad.read_dataset(dataset).test, batch_size=16, desc=None))
    assert max(sizes) == 3 and sum(sizes) == len(results) == len(vad.read_dataset(dataset).test)


def test_calibrate_rule_hand_computed():
    assert vad.threshold_from([4.0, 1.0, 2.0]) == pytest.approx(4.2)  # max 4, plus 10% of max 4 - median 2
    assert vad.threshold_from([3.0]) == 3.0 and vad.threshold_from([5.0, 5.0]) == 5.0  # no spread, no margin


def pairwise_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores, labels = rng.integers(0, 6, 60).astype(float), rng.integers(0, 2, 60)
        assert vad.auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    assert vad.auroc([1, 2, 3], [1, 1, 0]) == 0.0 and vad.auroc([1, 1], [0, 1]) == 0.5
    assert np.isnan(vad.auroc([1, 2], [1, 1]))


def test_aupro_hand_computed():
    # Two 1x4 images. Region R1 = image A pixels 0-1, region R2 = image B pixel 3; five
    # normal pixels. Thresholds, high to low: 0.9 covers half of R1 (PRO 0.25), 0.8 all of
    # R2 (PRO 0.75), 0.7 one normal pixel (FPR 0.2), 0.6 the rest of R1 together with a
    # second normal pixel (FPR 0.4, PRO 1). Area to FPR 0.3: 0.2*0.75 + 0.1*(0.75+0.875)/2
    # = 0.23125, normalized by 0.3. To FPR 1: 0.15 + 0.2*(0.75+1)/2 + 0.6 = 0.925.
    maps = np.array([[[0.9, 0.6, 0.7, 0.1]], [[0.2, 0.3, 0.6, 0.8]]])
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]]], bool)
    assert vad.aupro(maps, masks, 0.3) == pytest.approx(0.23125 / 0.3)
    assert vad.aupro(maps, masks, 1.0) == pytest.approx(0.925)


def test_aupro_regions_are_8_connected():
    # One diagonal region of two pixels: detecting one of them is PRO 0.5, not 1 (as it
    # would be with two 4-connected regions averaged).
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0] = 1.0
    # curve: (0, 0) -> (0, 0.5) at t=1, then (1, 1) at t=0; area = 0.5 + 0.5*0.5 = 0.75
    assert vad.aupro(maps, masks, 1.0) == pytest.approx(0.75)


def test_calibration_thresholds_against_brute_force():
    rng = np.random.default_rng(3)
    for n_good, n_bad in [(20, 0), (37, 5), (8, 8)]:
        good, bad = rng.normal(0, 1, n_good).round(1), rng.normal(1.5, 1, n_bad).round(1)  # with ties
        for frr in (0.0, 0.01, 0.05, 0.2, 0.5):
            t = vad.threshold_for_frr(good, frr)
            assert (good > t).sum() <= frr * n_good  # at most that many good images rejected ...
            assert all((good > c).sum() > frr * n_good for c in np.unique(good) if c < t)  # ... and no lower one
        if n_bad:
            t = vad.threshold_for_f1(good, bad)
            def f1(c):
                tp, fp, fn = (bad > c).sum(), (good > c).sum(), (bad <= c).sum()
                return 2 * tp / (2 * tp + fp + fn)
            cands = np.r_[good, bad, np.unique(np.r_[good, bad]) - 1e-9, -1e9]
            assert f1(t) == pytest.approx(max(f1(c) for c in cands))
    assert vad.threshold_for_frr([1.0, 2.0, 3.0, 4.0], 0.25) == 3.0  # one of four may be rejected: the 4
    assert vad.threshold_for_f1([1.0, 2.0], [3.0, 4.0]) == 2.5
    assert vad.confusion([1.0, 2.0, 3.0], [2.5, 4.0], 2.0) == {"good_ok": 2, "good_rejected": 1, "bad_caught": 2,
                                                               "bad_missed": 0}


def test_frr_upper_bound_is_the_clopper_pearson_beta_quantile():
    import scipy.stats

    for k, n in [(0, 1), (0, 20), (1, 20), (3, 50), (19, 20), (10, 1000), (0, 299), (250, 10000)]:
        assert vad.frr_upper_bound(k, n) == pytest.approx(scipy.stats.beta.ppf(0.95, k + 1, n - k), rel=1e-9)
    assert vad.frr_upper_bound(20, 20) == 1.0 and round(vad.frr_upper_bound(0, 20), 3) == 0.139  # the issue's 14%
    for frr in (0.05, 0.01, 0.001):  # the fewest images, none rejected, whose bound reaches frr
        n = vad.images_needed(frr)
        assert scipy.stats.beta.ppf(0.95, 1, n) <= frr < scipy.stats.beta.ppf(0.95, 1, n - 1)


def test_tail_threshold_exceedance_is_the_target_on_known_distributions():
    # Scores drawn from distributions with an exponential tail (Gumbel: maxima; shifted
    # exponential): the placed threshold's true exceedance (the known survival function)
    # is the target in the median over seeds; a lighter (normal) tail gives a higher,
    # safe threshold.
    import scipy.stats

    target = 0.01
    for dist, n, low, high in [(scipy.stats.gumbel_r(10, 2), 20, 0.006, 0.016),
                               (scipy.stats.gumbel_r(10, 2), 200, 0.005, 0.012),
                               (scipy.stats.expon(5, 3), 20, 0.008, 0.02), (scipy.stats.expon(5, 3), 200, 0.008, 0.0125),
                               (scipy.stats.norm(10, 1), 50, 0, target)]:
        rng = np.random.default_rng(0)
        exceedance = [dist.sf(vad.tail_threshold(dist.rvs(n, random_state=rng), target)) for _ in range(200)]
        assert low <= np.median(exceedance) <= high, (dist.dist.name, n, np.median(exceedance))
    scores = [1.0, 2.0, 3.0, 4.0, 10.0]  # median 3; excess 1 and 7 (mean 4) in 2 of 5: 3 + 4 ln(0.4 / 0.01)
    assert vad.tail_threshold(scores, 0.01) == pytest.approx(3 + 4 * math.log(40))


def test_cli_calibrate_states_the_rate_and_extrapolates_only_with_a_warning(model_file, dataset, tmp_path):
    import scipy.stats

    good = dataset / "test" / "good"
    model = vad.load(model_file)
    scores = np.array([r.score for r in vad.score_files(model, list_of(vad.read_dataset(dataset), 0), desc=None)])
    r = cli("calibrate", model_file, "--good", good, "--out", tmp_path / "tail.pt", "-q")  # 6 images, 1%
    assert r.exit_code == 0, r.output
    assert "6 good images cannot support a false-reject rate of 0.01" in r.stderr and "at least 299" in r.stderr
    u = np.median(scores)
    expected = u + (scores[scores > u] - u).mean() * math.log((scores > u).mean() / 0.01)
    calibrated = vad.load(tmp_path / "tail.pt")
    assert float(calibrated.threshold) == pytest.approx(expected) and expected > scores.max()
    bound = scipy.stats.beta.ppf(0.95, 1, 6)
    assert f"0 of 6 good images above the threshold (0.0%); at most {bound:.1%}" in r.stdout
    assert calibrated.info["frr_rejected"] == 0 and calibrated.info["frr_bound"] == pytest.approx(bound, abs=1e-6)
    assert [e["event"] for e in json.loads(calibrated.info["history"])] == ["fit", "calibrate"]
    r = cli("calibrate", model_file, "--good", good, "--target-frr", 0.5, "--out", tmp_path / "low.pt", "-q")
    assert r.exit_code == 0 and "cannot support" not in r.stderr  # 5 images bound 50%: 6 suffice
    t = vad.threshold_for_frr(scores, 0.5)
    k = int((scores > t).sum())
    assert f"{k} of 6 good images" in r.stdout and f"at most {scipy.stats.beta.ppf(0.95, k + 1, 6 - k):.1%}" in r.stdout
    assert ("below the one fit set" in r.stderr) == (t < float(model.threshold))
    assert t < float(model.threshold)  # the tiny model's held-out threshold sits above half the good images


@pytest.mark.parametrize("name", list(vad.DETECTORS))
def test_verdict_and_regions_agree_with_threshold_and_after_calibrate(name, fitted, dataset, tmp_path):
    # Issue 21: an ok image has no defect region, an anomalous one at least one, for
    # every detector, whatever set the image threshold (--threshold, calibrate, serve).
    vad.save(fitted[name], tmp_path / "m.pt")
    tests = vad.read_dataset(dataset).test
    scores = sorted(r.score for r in vad.score_files(fitted[name], tests, desc=None))
    runs = [cli("score", tmp_path / "m.pt", *tests, "--json", "-q", "--threshold", t) for t in
            (scores[len(scores) // 3], scores[2 * len(scores) // 3])]
    r = cli("calibrate", tmp_path / "m.pt", "--good", dataset / "test" / "good", "--target-frr", 0.5, "-q")
    assert r.exit_code == 0, r.output
    runs.append(cli("score", tmp_path / "m.pt", *tests, "--json", "-q"))
    records = [json.loads(line) for run in runs for line in run.stdout.splitlines()]
    assert len(records) == 3 * len(tests) and {"ok", "anomalous"} == {x["verdict"] for x in records}
    for x in records:
        assert (x["verdict"] == "ok") == (x["region_count"] == 0), x
        assert x["margin"] == pytest.approx(x["score"] - x["threshold"], abs=1e-9)
    with serving({"m": vad.load(tmp_path / "m.pt")}) as (srv, _):
        for path in tests:
            x = srv.inspect("m", path.read_bytes())
            assert (x["verdict"] == "ok") == (x["region_count"] == 0) and x["margin"] == x["score"] - x["threshold"]
    r = cli("score", tmp_path / "m.pt", *tests, "--json", "-q", "--pixel-threshold", -1e9)  # asked otherwise
    assert all(json.loads(line)["region_count"] == 1 for line in r.stdout.splitlines())


def test_region_level_hand_computed():
    m = np.array([[0.0, 1.0, 3.0], [np.nan, 2.0, 0.5]], dtype=np.float32)
    assert vad.region_level(m, False, 0.5, 0.0) is None  # ok: no region, whatever the map
    assert vad.region_level(m, True, 2.5, 0.0) == 2.5  # the peak 3 is above the pixel threshold
    assert vad.region_level(m, True, 5.0, 1.0) == 2.0  # under it: half-way from low 1 to the peak 3
    level = vad.region_level(m, True, 5.0, 4.0)  # a peak under the normal level: the peak alone
    assert vad.defect_mask(m, level).sum() == 1 and vad.defect_mask(m, None).sum() == 0


def test_defect_regions_against_a_hand_made_map_and_a_flood_fill():
    m = np.zeros((12, 16), dtype=np.float32)
    m[1:4, 1:5] = 2.0  # region A: 12 px, peak 3 at (2, 3)
    m[2, 3] = 3.0
    m[6, 10] = m[7, 11] = m[8, 12] = 5.0  # region B: a diagonal, one region when 8-connected
    m[10, 0] = 1.5  # region C: one pixel
    m[0, 15] = np.nan  # never a defect
    regions, count = vad.defect_regions(m, 1.0)
    assert count == 3 and [r["area"] for r in regions] == [12, 3, 1]
    assert regions[0] == {"box": [1, 1, 5, 4], "area": 12, "peak": 3.0, "centroid": [2.5, 2.0]}
    assert regions[1] == {"box": [10, 6, 13, 9], "area": 3, "peak": 5.0, "centroid": [11.0, 7.0]}
    assert regions[2]["box"] == [0, 10, 1, 11]
    # an independent reference: 8-connected flood fill in plain Python
    seen, found = set(), []
    for y, x in zip(*np.nonzero(np.nan_to_num(m) > 1.0)):
        if (y, x) in seen:
            continue
        stack, pixels = [(y, x)], []
        seen.add((y, x))
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < 12 and 0 <= nx < 16 and (ny, nx) not in seen and m[ny, nx] > 1.0:
                        seen.add((ny, nx))
                        stack.append((ny, nx))
        ys, xs = zip(*pixels)
        found.append((len(pixels), [min(xs), min(ys), max(xs) + 1, max(ys) + 1], max(m[p] for p in pixels)))
    assert sorted(found, key=lambda f: -f[0]) == [(r["area"], r["box"], r["peak"]) for r in regions]
    assert vad.defect_regions(m, 1.0, limit=1)[1] == 3 and len(vad.defect_regions(m, 1.0, limit=1)[0]) == 1
    assert vad.defect_regions(m, 10.0) == ([], 0)
    big, _ = vad.defect_regions(m, 1.0, scale=(2.0, 2.0))  # a half-size map of a twice larger image
    assert big[0]["box"] == [2, 2, 10, 8] and big[0]["area"] == 48 and big[0]["centroid"] == [5.5, 4.5]


def test_classification_and_f1_max_against_brute_force():
    rng = np.random.default_rng(1)
    scores, labels = rng.integers(0, 8, 40).astype(float), rng.integers(0, 2, 40)
    m = vad.classification(scores, labels, 3.5)
    pred = scores > 3.5
    tp, fp, fn = (pred & (labels == 1)).sum(), (pred & (labels == 0)).sum(), (~pred & (labels == 1)).sum()
    assert m["precision"] == pytest.approx(tp / (tp + fp)) and m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["accuracy"] == pytest.approx((pred == labels).mean())
    brute = max(2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + labels.sum()) for t in np.unique(scores))
    assert vad.f1_max(scores, labels) == pytest.approx(brute)


def test_beta_binomial_tail_against_scipy_and_its_binomial_limit():
    import scipy.stats
    for x, n, a, b in [(0, 10, 1, 21), (1, 10, 1, 21), (3, 20, 1, 21), (20, 20, 1, 21), (21, 20, 1, 21),
                       (150, 500, 2, 38), (40, 500, 7.5, 130.25), (0, 0, 1, 1)]:
        # the pmf summed: scipy's sf is 1 - cdf, which loses the far tail (6e-5 off at 20 of 20)
        expected = scipy.stats.betabinom.pmf(np.arange(x, n + 1), n, a, b).sum() if n else 1.0
        assert vad.beta_binomial_tail(x, n, a, b) == pytest.approx(expected, rel=1e-9, abs=1e-300), (x, n, a, b)
    # 20 of 20 above the maximum of 21: B(21, 21) / B(1, 21) = 21 * 20! 20! / 41!, exactly
    assert vad.beta_binomial_tail(20, 20, 1, 21) == pytest.approx(21 * math.factorial(20) ** 2 / math.factorial(41),
                                                                  rel=1e-12)
    # a held-out set so large that q is all but known: the test becomes the binomial one
    # (Beta(pm, (1 - p)m) has variance ~p(1 - p)/m; the tails differ by about n x / m)
    for x, n, p in [(9, 100, 0.05), (40, 500, 0.05), (3, 20, 0.2)]:
        m = 1e7
        assert vad.beta_binomial_tail(x, n, p * m, (1 - p) * m) == pytest.approx(scipy.stats.binom.sf(x - 1, n, p),
                                                                                 rel=1e-3)


def test_drift_reference_rank_and_its_null_distribution():
    """The reference is the k-th smallest held-out score, k = ceil(0.95 (n + 1)) at most n
    (hand-computed ranks); and for exchangeable scores the count of new ones above it
    follows the beta-binomial the test assumes (a simulation, against scipy's pmf)."""
    import scipy.stats
    for n, k in [(1, 1), (18, 18), (19, 19), (20, 20), (21, 21), (38, 38), (39, 38), (99, 95), (199, 190)]:
        scores = np.random.default_rng(n).permutation(np.arange(n, dtype=float))
        ref = vad.drift_reference(types.SimpleNamespace(held_out_scores=torch.tensor(scores)))
        assert (ref.rank, ref.held_out, ref.score) == (k, n, float(k - 1)), n
        assert ref.expected == pytest.approx((n + 1 - k) / (n + 1))
    assert vad.drift_reference(types.SimpleNamespace(held_out_scores=torch.empty(0))) is None
    n, N, reps = 21, 30, 20000
    draws = np.random.default_rng(0).normal(size=(reps, n + N))
    q = np.sort(draws[:, :n], axis=1)[:, 20]  # k = 21 of 21
    counts = np.bincount((draws[:, n:] > q[:, None]).sum(1), minlength=N + 1)
    expected = scipy.stats.betabinom.pmf(np.arange(N + 1), N, 1, 21) * reps
    assert scipy.stats.chisquare(counts[:8], expected[:8] / expected[:8].sum() * counts[:8].sum()).pvalue > 0.001
    assert counts[0] / reps == pytest.approx(21 / 51, abs=0.02)  # P(none above) = B(1, 51) / B(1, 21) = 21/51

# -----------------------------------------------------------------------------
# Export: ONNX graphs checked against the .pt, scored by ONNX Runtime (the optional
# extras: .ci/run installs them, so these never skip in CI)


def needs_export_extras():
    if os.environ.get("CI"):  # CI installs them: a missing extra is a failure there, not a skip
        import onnx, onnxruntime  # noqa: F401,E401
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session")
def exported(fitted, tmp_path_factory):
    """Every session model exported to a .onnx file."""
    needs_export_extras()
    folder = tmp_path_factory.mktemp("onnx")
    for name, detector in fitted.items():
        (folder / f"{name}.onnx").write_bytes(vad.export(detector))
    return {name: folder / f"{name}.onnx" for name in fitted}


@pytest.mark.parametrize("name", list(vad.DETECTORS))
def test_export_scores_as_the_pt_does(name, fitted, exported, dataset):
    """The export's parity check, as a test on the test images: score_files through the
    .pt (torch) and through its export (ONNX Runtime), in batches of 1 and 5 (the batch
    is dynamic): image scores to 1e-4 and maps to 1e-3, relative to the largest value;
    the same thresholds, framing and verdicts."""
    tests = vad.read_dataset(dataset).test
    reference = list(vad.score_files(fitted[name], tests, desc=None))
    model = vad.OnnxModel(exported[name])
    assert model.name == name and model.framing == fitted[name].framing
    assert float(model.threshold) == float(fitted[name].threshold)
    assert float(model.pixel_threshold) == float(fitted[name].pixel_threshold)
    s_ref, m_ref = np.array([r.score for r in reference]), np.stack([r.anomaly_map for r in reference])
    for batch_size in (1, 5):
        ours = list(vad.score_files(model, tests, batch_size, desc=None))
        s, m = np.array([r.score for r in ours]), np.stack([r.anomaly_map for r in ours])
        assert np.abs(s - s_ref).max() <= 1e-4 * np.abs(s_ref).max()
        assert np.abs(m - m_ref).max() <= 1e-3 * np.abs(m_ref).max()
        assert [r.verdict for r in ours] == [r.verdict for r in reference]


def test_export_metadata_and_cli(fitted, model_file, dataset, tmp_path):
    needs_export_extras()
    import onnx
    r = cli("export", model_file, "--check-images", vad.read_dataset(dataset).test[0], "-q")
    out = model_file.with_suffix(".onnx")
    assert r.exit_code == 0 and r.stdout.strip() == str(out), r.output
    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    checkpoint = torch.load(model_file, weights_only=True)
    assert meta["vad.format"] == "vad-onnx" and meta["vad.detector"] == "padim"
    assert meta["vad.threshold"] == checkpoint["threshold"]
    assert meta["vad.framing"] == json.loads(json.dumps(checkpoint["framing"]))
    assert meta["vad.source_sha256"] == checkpoint["sha256"] and meta["vad.input_size"] == [SIZE, SIZE]
    assert "10 inputs" in meta["vad.parity"]  # 9 synthetic, 1 checked image
    r = cli("score", out, *vad.read_dataset(dataset).test[:2], "-q")  # a .onnx scores where a .pt does
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2, r.output
    # nothing overwritten that vad did not write; an export is not exported again
    other = tmp_path / "notes.onnx"
    other.write_text("mine")
    r = cli("export", model_file, "--out", other, "-q")
    assert r.exit_code == 2 and "not a vad model" in r.stderr and other.read_text() == "mine"
    assert cli("export", out, "-q").exit_code == 2
    r = cli("export", model_file, "--out", tmp_path / "m.txt", "-q")
    assert r.exit_code == 2 and ".onnx" in r.stderr
    r = cli("calibrate", out, "--good", vad.read_dataset(dataset).test[0])
    assert r.exit_code == 2 and "calibrate the .pt" in r.stderr


def test_export_refuses_a_graph_that_scores_differently(model_file, tmp_path, monkeypatch):
    """A graph 1% off in its scores (a stand-in for an export bug) is refused with the
    largest difference, and no file is written."""
    needs_export_extras()

    class Off(vad.PaDiMGraph):
        def forward(self, images):
            scores, maps = super().forward(images)
            return scores * 1.01, maps
    monkeypatch.setitem(vad.GRAPHS, "padim", Off)
    r = cli("export", model_file, "--out", tmp_path / "m.onnx", "-q")
    assert r.exit_code == 2 and "does not score as the model does" in r.stderr and "scores 0.01" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and list(tmp_path.glob("*.onnx*")) == []


def test_crafted_onnx_files_are_refused_in_one_line(exported, dataset, tmp_path):
    needs_export_extras()
    import onnx
    image = vad.read_dataset(dataset).test[0]

    def variant(name, change):
        model = onnx.load(exported["padim"])
        props = {p.key: p.value for p in model.metadata_props}
        change(props)
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, tmp_path / f"{name}.onnx")
        return tmp_path / f"{name}.onnx"

    cases = {
        "garbage": (tmp_path / "garbage.onnx", "not a model ONNX Runtime can run"),
        "plain": (variant("plain", lambda p: p.clear()), "no vad metadata"),
        "nan": (variant("nan", lambda p: p.update({"vad.threshold": "NaN"})), "not a finite number"),
        "framing": (variant("framing", lambda p: p.update({"vad.framing": json.dumps(
            {"size": [SIZE, SIZE], "resize": "fit", "tile": 5, "overlap": 0.25})})), "framing is not valid"),
        "size": (variant("size", lambda p: p.update({"vad.input_size": "[32, 32]", "vad.framing": json.dumps(
            {"size": [32, 32], "resize": "fit", "tile": None, "overlap": 0.25})})), "not images float (N, 3, 32, 32)"),
        "infinite": (variant("infinite", lambda p: p.update({"vad.framing": p["vad.framing"].replace(
            f"[{SIZE}, {SIZE}]", f"[Infinity, {SIZE}]")})), "Infinity is not a finite number"),
        "huge tile": (variant("huge", lambda p: p.update({"vad.input_size": "[16384, 16384]", "vad.framing": json.dumps(
            {"size": None, "resize": "fit", "tile": 16384, "overlap": 0.25})})), "over 100,000,000 pixels"),
        "version": (variant("version", lambda p: p.update({"vad.format_version": "true"})), "format version True"),
        "extra": (variant("extra", lambda p: p.update({"vad.extra": "1"})), "unexpected metadata keys"),
    }
    (tmp_path / "garbage.onnx").write_bytes(os.urandom(4096))
    # a graph with export's signature and metadata whose maps are the input itself (N, 3, H, W)
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["images"], ["maps"]),
                          h.make_node("ReduceMax", ["images"], ["scores"], axes=[1, 2, 3], keepdims=0)], "odd",
                         [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                         [h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N"]),
                          h.make_tensor_value_info("maps", onnx.TensorProto.FLOAT, ["N", 3, SIZE, SIZE])])
    odd = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    odd.metadata_props.extend(onnx.load(exported["padim"]).metadata_props)
    onnx.save(odd, tmp_path / "odd.onnx")
    cases["odd"] = (tmp_path / "odd.onnx", "not what export writes")
    # ... and one whose scores are NaN, which must never pass as "ok" (NaN > threshold is False)
    graph = h.make_graph([h.make_node("ReduceMean", ["images"], ["mean"], axes=[1], keepdims=0),
                          h.make_node("Div", ["mean", "zero"], ["ratio"]), h.make_node("Mul", ["ratio", "zero"], ["maps"]),
                          h.make_node("ReduceMax", ["maps"], ["scores"], axes=[1, 2], keepdims=0)], "nan",
                         [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                         [h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N"]),
                          h.make_tensor_value_info("maps", onnx.TensorProto.FLOAT, ["N", SIZE, SIZE])],
                         [h.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0])])
    nan = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    nan.metadata_props.extend(onnx.load(exported["padim"]).metadata_props)
    onnx.save(nan, tmp_path / "nan-scores.onnx")
    cases["nan scores"] = (tmp_path / "nan-scores.onnx", "NaN or infinite scores")
    for path, message in cases.values():
        r = cli("score", path, image)
        assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.output, (path, r.output)
        assert len(r.stderr.strip().splitlines()) == 1


def test_cli_info_shows_what_a_model_is_and_how_its_thresholds_were_set(dataset, exported, fitted, tmp_path):
    import scipy.stats

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    train = vad.read_dataset(dataset).train
    old, new = copy_images(train[:10], tmp_path / "old"), copy_images(train[10:14], tmp_path / "new")
    model = tmp_path / "m.pt"
    r = cli("fit", "--model", "padim", "--data", old, *TINY[:2], "--weights", tmp_path / "r18.pth", *TINY[4:],
            "-s", "d=20", "-s", "updatable=true", "--out", model)
    assert r.exit_code == 0, r.output
    assert cli("calibrate", model, "--good", dataset / "test" / "good", "--target-frr", 0.5, "-q").exit_code == 0
    assert cli("fit", "--update", model, "--data", new, "-q").exit_code == 0
    r = cli("info", model, "--json")
    assert r.exit_code == 0 and not r.stderr, r.output
    card, detector = json.loads(r.stdout), vad.load(model)
    assert card["detector"] == "padim" and card["backbone"] == "resnet18" and card["precision"] == "fp32"
    assert card["weights"]["file"] == "r18.pth"
    assert card["weights"]["sha256"] == hashlib.sha256((tmp_path / "r18.pth").read_bytes()).hexdigest()
    assert card["settings"]["d"] == 20 and card["settings"]["updatable"] is True and "exact" in card["update"]
    assert card["thresholds"]["image"] == float(detector.threshold)
    assert card["thresholds"]["pixel"] == float(detector.pixel_threshold)
    assert card["thresholds"]["rule"].startswith("held-out")  # the update set it again from the held-out images
    held = detector.held_out_scores.numpy()  # fit's 1 held-out image and the update's
    k = int((held > float(detector.threshold)).sum())
    assert card["false_reject"]["images"] == len(held) == 2 and card["false_reject"]["rejected"] == k == 0
    assert card["false_reject"]["upper_bound"] == pytest.approx(scipy.stats.beta.ppf(0.95, k + 1, 2 - k), abs=1e-6)
    names = "".join(f"{p.name}|{p.stat().st_size}\n" for p in sorted(old.iterdir()))
    assert card["training"]["fingerprint"] == hashlib.sha256(names.encode()).hexdigest()
    assert card["training"]["layout"] == "folder of good images" and card["training"]["images"] == 9 + 4 - 1
    assert [e["event"] for e in card["history"]] == ["fit", "calibrate", "update"]
    assert card["sha256"] == torch.load(model, weights_only=True)["sha256"] and card["export_parity"] is None
    text = cli("info", model).stdout
    assert "at most 77.6% with 95% confidence" in text and "history 3: event update" in text  # 1 - 0.05^(1/2)
    r = cli("info", exported["patchcore"], "--json")
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)
    assert card["detector"] == "patchcore" and "ONNX" in card["format"] and "ONNX Runtime" in card["export_parity"]
    assert card["settings"] == json.loads(json.dumps(vad.dataclasses.asdict(fitted["patchcore"].config)))
    assert card["source_sha256"] is None and card["thresholds"]["image"] == pytest.approx(float(fitted["patchcore"].threshold))
    assert cli("info", tmp_path / "missing.pt").exit_code == 2


def test_export_extras_missing_is_one_line(model_file, dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when not installed
    for args in (("export", model_file), ("score", model_file.with_suffix(".onnx"), vad.read_dataset(dataset).test[0])):
        r = cli(*args)
        assert r.exit_code == 2 and "pip install onnx onnxruntime" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1


def readme_script():
    text = (Path(vad.__file__).parent / "README.md").read_text()
    return re.search(r'```python\n("""Score images with a model from `vad.py export`.*?)```', text, re.S)[1]


NO_TORCH = "import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0])"


def test_readme_no_torch_script_scores_as_vad(exported, fitted, dataset, tmp_path):
    """The README's script, run with torch made unimportable, gives the scores and
    verdicts vad gives with the same .onnx (and the .pt's to 1e-4); its --serve mode
    answers /health and /score."""
    needs_export_extras()
    script = tmp_path / "score_onnx.py"
    script.write_text(readme_script())
    tests = vad.read_dataset(dataset).test
    run = subprocess.run([sys.executable, "-c", NO_TORCH, script, exported["padim"], *tests],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    ours = list(vad.score_files(vad.OnnxModel(exported["padim"]), tests, desc=None))
    assert [line["path"] for line in lines] == [str(p) for p in tests]
    assert [line["verdict"] for line in lines] == [r.verdict for r in ours]
    np.testing.assert_allclose([line["score"] for line in lines], [r.score for r in ours], rtol=1e-6)
    reference = [r.score for r in vad.score_files(fitted["padim"], tests, desc=None)]
    np.testing.assert_allclose([line["score"] for line in lines], reference, rtol=1e-4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", NO_TORCH, script, exported["padim"], "--serve", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert http(f"http://127.0.0.1:{port}/health", timeout=5) == (200, {"status": "ok"})
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()
                time.sleep(0.2)
        status, result = http(f"http://127.0.0.1:{port}/score", tests[-1].read_bytes())
        assert status == 200 and result["score"] == pytest.approx(lines[-1]["score"], rel=1e-6)
        assert http(f"http://127.0.0.1:{port}/score", b"not an image")[0] == 400
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_bench_runtimes_give_the_same_aurocs(dataset):
    needs_export_extras()
    rows = vad.bench([dataset], ["padim"], vad.RunOptions(backbone="resnet18", weights="none", image_size=SIZE,
                                                          device="cpu", settings=tuple(FAST["padim"])),
                     runtimes=("torch", "onnxruntime"))
    torch_row, onnx_row = rows
    assert (torch_row["runtime"], onnx_row["runtime"]) == ("torch", "onnxruntime")
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(torch_row[key] - onnx_row[key]) <= 1e-4, key
    assert "| tiles | padim | onnxruntime | resnet18 |" in vad.bench_table(rows)
    with pytest.raises(vad.VadError, match="--runtime"):
        vad.bench([dataset], ["padim"], runtimes=("tensorrt",))

# -----------------------------------------------------------------------------
# Bench and the synthetic set


def test_make_synthetic_is_deterministic_mvtec_layout(tmp_path):
    a = vad.make_synthetic(tmp_path / "a", "part", size=48, n_train=3, n_good=2, n_defect=1)
    b = vad.make_synthetic(tmp_path / "b", "part", size=48, n_train=3, n_good=2, n_defect=1)
    ds = vad.read_dataset(a)
    assert len(ds.train) == 3 and len(ds.test) == 5 and sum(ds.labels) == 3
    assert all(m is not None and m.exists() for m, y in zip(ds.masks, ds.labels) if y)
    for p in ds.test + ds.train:
        assert (np.asarray(Image.open(p)) == np.asarray(Image.open(b / p.relative_to(a)))).all()
    for m in filter(None, ds.masks):
        assert vad.read_mask(m, 48).any()  # every defect is visible in its mask


def test_bench_warns_when_other_work_disturbs_its_timings(dataset, monkeypatch):
    args = ["bench", "--model", "padim", "--data", dataset, *TINY, "-s", "d=20"]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine ...
    quiet = iter([(100.0, 10.0), (100.5, 10.5)])  # ... where only bench itself used the CPU
    monkeypatch.setattr(vad, "cpu_seconds", lambda: next(quiet))
    r = cli(*args)
    assert r.exit_code == 0 and "timings" not in r.stderr
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # busy before
    busy = iter([(100.0, 10.0), (1e6, 11.0)])  # others busy for far longer than bench ran
    monkeypatch.setattr(vad, "cpu_seconds", lambda: next(busy))
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "load average is 9.0" in r.stderr and "other processes used" in r.stderr
    assert "timings" not in r.stdout

# -----------------------------------------------------------------------------
# Plumbing: stage timers, prefetching


def test_stage_timers_add_up(dataset):
    with vad.stage_timing():
        with vad.timed("outer"):
            time.sleep(0.05)
            for _ in range(2):  # a stage's seconds add up over its blocks
                with vad.timed("inner"):
                    time.sleep(0.05)
    assert vad.STAGE_SECONDS["inner"] >= 0.1 and vad.STAGE_SECONDS["outer"] - vad.STAGE_SECONDS["inner"] >= 0.05
    with vad.stage_timing():
        vad.fit(vad.read_dataset(dataset).train, "patchcore", backbone="resnet18", weights="none", image_size=SIZE,
                device="cpu")
    assert {"features", "coreset", "search", "maps", "load"} <= set(vad.STAGE_SECONDS)
    vad.STAGE_SECONDS.clear()  # outside bench's stage_timing(), timed() records nothing (issue 22)
    with vad.timed("outer"):
        time.sleep(0.01)
    assert not vad.STAGE_SECONDS and not vad.TIMING


def test_core_never_refers_to_the_tools():
    """vad.py's two layers (issue 22): no top-level definition above the "Tools" banner
    names a top-level definition below it, so the core can be vendored alone."""
    import ast
    source = Path(vad.__file__).read_text()
    lines = source.splitlines()
    cut = lines.index("# Tools: export, bench, heat maps, serving and the CLI, built on the core above.") + 1
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        for name in names:
            defined.setdefault(name, node.lineno)
    tools = {name for name, line in defined.items() if line > cut}
    assert {"export", "bench", "InspectionServer", "cli", "OnnxModel"} <= tools and "fit" not in tools
    used = {(node.lineno, sub.id) for node in tree.body if node.lineno < cut for sub in ast.walk(node)
            if isinstance(sub, ast.Name) and sub.id in tools}
    assert not used, sorted(used)[:5]


def test_prefetch_keeps_order_passes_errors_and_stops_early():
    assert list(vad.prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("boom")
    got = []
    with pytest.raises(ValueError, match="boom"):
        for x in vad.prefetch(failing()):
            got.append(x)
    assert got == [1]
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i
    stream = vad.prefetch(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # the worker must stop, not fill memory
    time.sleep(0.5)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n and n < 10

# -----------------------------------------------------------------------------
# CLI


def test_cli_fit_score_bench(dataset, tmp_path):
    model = tmp_path / "tiles.pt"
    r = cli("fit", "--model", "padim", "--data", dataset, "--out", model, *TINY, "-s", "d=40")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(model) and model.exists()
    assert torch.load(model, weights_only=True)["info"]["held_out"] == 2

    tests = vad.read_dataset(dataset).test
    r = cli("score", model, *tests, "-q")
    assert r.exit_code == 0, r.output
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    assert [Path(p) for p, _, _, _ in lines] == tests  # one line per image, input order
    assert {v for _, _, v, _ in lines} <= {"ok", "anomalous"}
    scores = np.array([float(s) for _, s, _, _ in lines])
    assert vad.auroc(scores, vad.read_dataset(dataset).labels) >= 0.9

    r = cli("bench", "--model", "padim", "--data", dataset, "--json", tmp_path / "b.json", *TINY, "-s", "d=40")
    assert r.exit_code == 0, r.output
    assert "| tiles | padim | torch | resnet18 |" in r.stdout and "F1-max (oracle)" in r.stdout
    result = json.loads((tmp_path / "b.json").read_text())[0]
    assert result["image_auroc"] >= 0.9 and result["peak_mb"] > 0
    where = result["machine"]  # where it ran, in the header and the JSON
    assert where["threads"] == torch.get_num_threads() and where["torch"] == torch.__version__
    assert f"machine: {where['cpu']} ({where['isa']}), {where['threads']} threads" in r.stdout
    assert where["cpu"] == vad.cpu_info()[0] and where["isa"] == vad.isa_level()


def test_cli_score_reports_regions_masks_and_takes_a_threshold(model_file, dataset, tmp_path):
    ds = vad.read_dataset(dataset)
    paths = [ds.test[0], ds.test[-1]]  # a defect, a good one
    r = cli("score", model_file, *paths, "--json", "--masks", tmp_path / "k", "--maps", tmp_path / "m", "-q")
    assert r.exit_code == 0, r.output
    model = vad.load(model_file)
    for record in map(json.loads, r.stdout.splitlines()):
        anomaly_map = np.load(record["map"])
        mask = np.asarray(Image.open(record["mask"]))
        assert record["pixel_threshold"] == float(model.pixel_threshold)
        assert np.array_equal(mask == 255, anomaly_map > record["pixel_threshold"]) and set(np.unique(mask)) <= {0, 255}
        assert (record["regions"], record["region_count"]) == tuple(json.loads(json.dumps(
            vad.defect_regions(anomaly_map, record["pixel_threshold"]))))
        assert sum(x["area"] for x in record["regions"]) == int(mask.astype(bool).sum())
    scores = [json.loads(line)["score"] for line in r.stdout.splitlines()]
    middle = (scores[0] + scores[1]) / 2
    r = cli("score", model_file, *paths, "--threshold", middle, "--json", "-q")
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["verdict"] for x in records] == ["anomalous" if s > middle else "ok" for s in scores]
    assert all(x["threshold"] == pytest.approx(middle, rel=1e-6) for x in records)  # a float32 buffer
    assert len({x["verdict"] for x in records}) == 2
    assert cli("score", model_file, *paths, "--threshold", "nan").exit_code == 2


def test_cli_calibrate_sets_the_threshold_from_labelled_images(model_file, dataset, tmp_path):
    ds = vad.read_dataset(dataset)
    good, bad = dataset / "test" / "good", dataset / "test" / "defect"
    model = vad.load(model_file)
    good_scores = [r.score for r in vad.score_files(model, list_of(ds, 0), desc=None)]
    bad_scores = [r.score for r in vad.score_files(model, list_of(ds, 1), desc=None)]
    original = model_file.read_bytes()
    r = cli("calibrate", model_file, "--good", good, "--target-frr", 0, "--out", tmp_path / "frr.pt", "-q")
    assert r.exit_code == 0, r.output
    assert model_file.read_bytes() == original  # --out: the original stays
    calibrated = vad.load(tmp_path / "frr.pt")
    assert float(calibrated.threshold) == pytest.approx(max(good_scores))  # no good image rejected
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"before: threshold {float(model.threshold):.6g}") and lines[1].startswith("after:")
    assert lines[1].endswith(f"good {len(good_scores)} ok, 0 rejected")
    assert "calibrated" in calibrated.info
    r = cli("calibrate", model_file, "--good", good, "--bad", bad, "--max-f1", "-q")  # in place
    assert r.exit_code == 0, r.output
    expected = vad.threshold_for_f1(good_scores, bad_scores)
    assert float(vad.load(model_file).threshold) == pytest.approx(expected)
    assert f"after: threshold {expected:.6g}" in r.stdout and "caught" in r.stdout
    assert cli("calibrate", model_file, "--good", good, "--max-f1").exit_code == 2  # no --bad
    assert cli("calibrate", model_file, "--good", tmp_path / "none").exit_code == 2


def copy_images(paths, folder):
    for p in paths:
        save_png(np.asarray(Image.open(p)), folder / p.name)
    return folder


def test_cli_fit_update_adds_images_to_padim_and_patchcore(dataset, tmp_path):
    train = vad.read_dataset(dataset).train
    old, new = copy_images(train[:8], tmp_path / "old"), copy_images(train[8:14], tmp_path / "new")
    for model, settings in (("padim", ["-s", "d=20", "-s", "updatable=true"]), ("padim", ["-s", "d=20"]),
                            ("patchcore", [])):
        m = tmp_path / f"{model}.pt"
        assert cli("fit", "--model", model, "--data", old, "--out", m, *TINY, *settings).exit_code == 0
        original = m.read_bytes()
        r = cli("fit", "--update", m, "--data", new, "--out", tmp_path / "new.pt", "--device", "cpu", "-q")
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == str(tmp_path / "new.pt") and m.read_bytes() == original  # --out: the old stays
        expected = vad.update(vad.load(m), new)
        updated = vad.load(tmp_path / "new.pt")
        assert updated.info["added"] == 6 and updated.config == expected.config
        assert all(torch.equal(t, expected.state_dict()[k]) for k, t in updated.state_dict().items())
        r = cli("fit", "--update", m, "--data", new, "--device", "cpu", "-q")  # in place
        assert r.exit_code == 0 and m.read_bytes() == (tmp_path / "new.pt").read_bytes()


def list_of(dataset, label):
    return [p for p, y in zip(dataset.test, dataset.labels) if y == label]


def test_cli_score_json_heatmaps_maps_stdin(fitted, dataset, tmp_path):
    vad.save(fitted["patchcore"], tmp_path / "m.pt")
    tests = vad.read_dataset(dataset).test
    paths = [tests[-1], tests[0]]  # test/good/005.png and test/defect/000.png
    r = cli("score", tmp_path / "m.pt", "-", "--json", "--heatmaps", tmp_path / "h", "--maps", tmp_path / "n", "-q",
            input="\n".join(map(str, paths)) + "\n")
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["path"] for rec in records] == list(map(str, paths))
    assert records[0]["heatmap"] == str(tmp_path / "h" / "good" / "005.png.png")  # named relative to test/
    assert records[1]["map"] == str(tmp_path / "n" / "defect" / "000.png.npy")
    for rec in records:
        assert rec["verdict"] == ("anomalous" if rec["score"] > rec["threshold"] else "ok")
        assert Image.open(rec["heatmap"]).size == (SIZE, SIZE)
        m = np.load(rec["map"])
        assert m.shape == (SIZE, SIZE) and m.dtype == np.float32
    _, maps = fitted["patchcore"].score(vad.read_image(paths[1], SIZE)[None])
    np.testing.assert_allclose(np.load(records[1]["map"]), maps[0].numpy(), rtol=1e-6)


def test_cli_score_reports_unreadable_and_scores_the_rest(fitted, dataset, tmp_path):
    vad.save(fitted["padim"], tmp_path / "m.pt")
    folder = tmp_path / "batch"
    good = vad.read_dataset(dataset).test[:3]
    for p in good:
        (folder / p.name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    r = cli("score", tmp_path / "m.pt", folder, "-q")
    assert r.exit_code == 3
    assert len(r.stdout.splitlines()) == 3 and "broken.png" not in r.stdout
    assert "broken.png" in r.stderr


def test_cli_score_shards_cover_every_input_once_in_order(model_file, dataset):
    """--shard K/N for K = 0..N-1: every input in exactly one shard, and the shards'
    outputs joined in K order are the unsharded output (scores to rounding: a shard's
    batches hold other images, and batched kernels round differently); N larger than
    the inputs leaves some shards empty."""
    tests = vad.read_dataset(dataset).test
    whole = cli("score", model_file, dataset / "test", "-q")
    assert whole.exit_code == 0 and len(whole.stdout.splitlines()) == len(tests)
    for n in (1, 3, len(tests) + 2):
        parts = [cli("score", model_file, dataset / "test", "--shard", f"{k}/{n}", "-q") for k in range(n)]
        assert all(r.exit_code == 0 for r in parts)
        joined = [line.split("\t") for r in parts for line in r.stdout.splitlines()]
        expected = [line.split("\t") for line in whole.stdout.splitlines()]
        assert [(p, v) for p, _, v, _ in joined] == [(p, v) for p, _, v, _ in expected]
        np.testing.assert_allclose([float(s) for _, s, _, _ in joined], [float(s) for _, s, _, _ in expected], rtol=1e-5)
        assert max(len(r.stdout.splitlines()) for r in parts) - min(len(r.stdout.splitlines()) for r in parts) <= 1
    for bad in ("3/3", "1/0", "a/b", "-1/2", "1"):
        r = cli("score", model_file, dataset / "test", "--shard", bad)
        assert r.exit_code == 2 and "--shard" in r.stderr and len(r.stderr.strip().splitlines()) == 1, bad


def test_cli_usage_errors_are_one_line(dataset, tmp_path):
    r = cli("fit", "--model", "patchcore", "--data", dataset, *TINY, "-s", "bogus=1")
    assert r.exit_code == 2 and "coreset_ratio=" in r.stderr and "Traceback" not in r.output
    r = cli("fit", "--model", "patchcore", "--data", tmp_path / "nowhere", *TINY)
    assert r.exit_code == 2 and "nowhere" in r.stderr
    r = cli("score", tmp_path / "missing.pt", dataset)
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_cli_help_every_option_settings_layouts_and_whole_summaries():
    """Every option of every command has help; fit's help lists each detector's -s keys
    with values that are their defaults (make_config gives the default config back); bench
    names each data layout; no command summary in `vad.py --help` is cut off."""
    for name, command in vad.cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and "\n" not in param.help.strip(), (name, param.opts)
    top = cli("--help").stdout.split("Commands:\n")[1].splitlines()
    assert len(top) == len(vad.cli.commands)
    for line in top:
        assert not line.rstrip().endswith("..."), line
    text = cli("fit", "--help").stdout
    blocks = {}
    for word in text.split("says what each does):")[1].split():
        if "=" in word:
            blocks[detector_name].append(word)
        else:
            detector_name = word
            blocks[word] = []
    assert list(blocks) == list(vad.DETECTORS)
    for name, detector in vad.DETECTORS.items():
        listed = dict(item.split("=", 1) for item in blocks[name])
        assert set(listed) == {f.name for f in dataclasses.fields(detector.Config)}, name
        assert vad.make_config(name, [f"{k}={v}" for k, v in listed.items()]) == detector.Config(), name
    text = " ".join(cli("bench", "--help").stdout.split())
    for layout in ["MVTec AD", "MVTec AD 2", "BTech", "VisA", *(layout for layout, *_ in vad.LAYOUTS)]:
        assert f"{layout} (" in text, layout


@pytest.fixture(scope="session")
def drift_case(tmp_path_factory):
    """A PaDiM model with 20 held-out images, and 12 new images of the same textures
    beside 12 brightened by 40 grey levels (a new lamp on the line) -> (model file,
    the same images, the brightened ones)."""
    root = tmp_path_factory.mktemp("drift")
    rng = np.random.default_rng(7)
    for folder, n, shift in (("train", 40, 0), ("same", 12, 0), ("bright", 12, 40)):
        for i in range(n):
            save_png(texture(rng, SIZE) + shift, root / folder / f"{i:03d}.png")
    detector = fit_tiny("padim", root / "train", holdout=0.5)
    vad.save(detector, root / "m.pt")
    return root / "m.pt", sorted((root / "same").glob("*.png")), sorted((root / "bright").glob("*.png"))


def test_cli_score_summary_and_drift_warning_on_brightened_images(drift_case):
    import scipy.stats
    model_file, same, bright = drift_case
    held = np.sort(vad.load(model_file).held_out_scores.numpy())
    assert len(held) == 20  # so the reference is the 20th of 20, the maximum: ceil(0.95 * 21) = 20
    for images, drifts in ((same, False), (bright, True)):
        r = cli("score", model_file, *images, "--json")
        records = [json.loads(line) for line in r.stdout.splitlines()]
        scores = np.array([x["score"] for x in records])
        anomalous = sum(x["verdict"] == "anomalous" for x in records)
        above, good_above = int((scores > held[-1]).sum()), sum(x["score"] > held[-1] and x["verdict"] == "ok"
                                                                  for x in records)
        summary = r.stderr.strip().splitlines()[-2 if drifts else -1]
        assert r.exit_code == 0 and summary.startswith(f"scored 12, anomalous {anomalous}, errors 0; {above} of 12 "
                                                       f"scores ({100 * above / 12:.1f}%), {good_above} of "
                                                       f"{12 - anomalous} good-verdict ones"), summary
        p = scipy.stats.betabinom.pmf(np.arange(above, 13), 12, 1, 20).sum()
        shown = re.search(r"percentile ([^,]+), where 4\.8% is expected from 20 held-out scores \(beta-binomial "
                          r"p = ([^)]+)\)$", summary)
        assert float(shown[1]) == pytest.approx(held[-1], rel=1e-5) and float(shown[2]) == pytest.approx(p, rel=0.05)
        assert (p < 0.001) == drifts and ("warning: drift:" in r.stderr) == drifts, r.stderr
    quiet = cli("score", model_file, *bright, "-q")
    assert quiet.stderr == r.stderr.splitlines()[-1] + "\n"  # -q: the warning alone

# -----------------------------------------------------------------------------
# The scripting contract: one test per row of the README's table


def test_contract_data_missing_empty_or_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("no images here")
    for folder, expected in [("missing", "no such folder"), ("empty", "no images found"), ("texts", "no images found")]:
        r = cli("fit", "--model", "padim", "--data", tmp_path / folder, *TINY)
        assert r.exit_code == 2 and expected in r.stderr and folder in r.stderr
        assert r.stderr.count("\n") == 1 and not r.stdout


def test_contract_layouts_are_recognised_and_labelled_folders_refused(tmp_path):
    image = np.full((40, 40, 3), 128.0)

    def tree(root, files):
        for name in files:
            save_png(image, root / name)
        return root
    ad2 = tree(tmp_path / "ad2", ["train/good/0.png", "train/good/1.png", "validation/good/2.png",
                                  "test_public/good/3.png", "test_public/bad/4.png",
                                  "test_public/ground_truth/bad/4_mask.png"])
    ds = vad.read_dataset(ad2)
    assert ds.layout == "MVTec AD 2" and [p.name for p in ds.train] == ["0.png", "1.png"]
    assert [(p.name, y) for p, y in zip(ds.test, ds.labels)] == [("3.png", 0), ("4.png", 1)]
    assert ds.masks == [None, ad2 / "test_public/ground_truth/bad/4_mask.png"]
    btech = tree(tmp_path / "btech", ["train/ok/0.png", "test/ok/1.png", "test/ko/2.png", "ground_truth/ko/2.png"])
    ds = vad.read_dataset(btech)
    assert ds.layout == "BTech" and [p.name for p in ds.train] == ["0.png"]
    assert ds.labels == [0, 1]  # test/ok, then test/ko
    assert dict(zip([p.name for p in ds.test], ds.masks)) == {"1.png": None, "2.png": btech / "ground_truth/ko/2.png"}
    mvtec = tree(tmp_path / "mvtec", ["train/good/0.png", "test/good/1.png", "test/crack/2.png",
                                      "ground_truth/crack/2_mask.png"])
    assert vad.read_dataset(mvtec).layout == "MVTec AD" and vad.read_dataset(mvtec).labels == [1, 0]
    visa = tmp_path / "VisA"  # the 1-class split file lists two categories; --data names one
    tree(visa, ["candle/Data/Images/Normal/0.png", "candle/Data/Images/Normal/1.png", "candle/Data/Images/Normal/2.png",
                "candle/Data/Images/Anomaly/3.png", "candle/Data/Masks/Anomaly/3.png", "pcb1/Data/Images/Normal/0.png"])
    (visa / "split_csv").mkdir()
    (visa / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0.png,\ncandle,train,normal,candle/Data/Images/Normal/1.png,\n"
        "pcb1,train,normal,pcb1/Data/Images/Normal/0.png,\ncandle,test,normal,candle/Data/Images/Normal/2.png,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/3.png,candle/Data/Masks/Anomaly/3.png\n")
    ds = vad.read_dataset(visa / "candle")
    assert ds.layout == "VisA (1cls split)" and ds.train == [visa / "candle/Data/Images/Normal/0.png",
                                                              visa / "candle/Data/Images/Normal/1.png"]
    assert ds.test == [visa / "candle/Data/Images/Normal/2.png", visa / "candle/Data/Images/Anomaly/3.png"]
    assert ds.labels == [0, 1] and ds.masks == [None, visa / "candle/Data/Masks/Anomaly/3.png"]
    with pytest.raises(vad.VadError, match="point --data at one category"):
        vad.read_dataset(visa)
    (visa / "split_csv/1cls.csv").write_text("object,split,label,image,mask\n"
                                              "candle,train,normal,../../outside.png,\n")
    with pytest.raises(vad.VadError, match="outside"):
        vad.read_dataset(visa / "candle")
    (visa / "split_csv/1cls.csv").write_text("object,split,label,image,mask\n"
                                              "candle,train,anomaly,candle/Data/Images/Anomaly/3.png,\n")
    with pytest.raises(vad.VadError, match="anomaly in the training split"):
        vad.read_dataset(visa / "candle")
    plain = tree(tmp_path / "plain", ["line1/0.png", "line2/1.png"])
    assert vad.read_dataset(plain).layout == "folder of good images" and len(vad.read_dataset(plain).train) == 2
    for name, files in [("btech-like", ["ok/0.png", "ko/1.png"]), ("mixed", ["0.png", "test/1.png"]),
                        ("masks", ["good/0.png", "ground_truth/0_mask.png"]), ("defects", ["a/0.png", "a/Defect_3/1.png"]),
                        ("no train/good", ["train/ok_not/0.png", "test/bad/1.png"])]:
        root = tree(tmp_path / name, files)
        with pytest.raises(vad.VadError, match="labelled"):  # a labelled split (ok/ beside ko/) names ok/
            vad.read_dataset(root)
        r = cli("fit", "--model", "padim", "--data", root, *TINY)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "good images only" in r.stderr


def test_contract_labelled_splits_are_refused_naming_the_normal_folder(tmp_path):
    # Issue 21: MVTec's test/ (good/ beside defect classes) and ok/ beside ng/, at any
    # depth of the recursive read, are refused with exit 2 and nothing written.
    image = np.full((40, 40, 3), 128.0)
    cases = {"mvtec-test": (["good/0.png", "good/1.png", "broken_large/2.png", "contamination/3.png"], "good"),
             "line": (["day1/OK/0.png", "day1/OK/1.png", "day1/NG/2.png"], "day1/OK"),
             "layout": (["train/good/0.png", "train/good/Pass/1.png", "train/good/scratch/2.png"],
                        "train/good/Pass")}
    for name, (files, normal) in cases.items():
        for f in files:
            save_png(image, tmp_path / name / f)
        before = sorted(tmp_path.rglob("*"))
        r = cli("fit", "--model", "padim", "--data", tmp_path / name, "--out", tmp_path / f"{name}.pt", *TINY)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and not r.stdout, r.output
        assert f"point --data at {tmp_path / name / normal} " in r.stderr and "labelled split" in r.stderr
        assert sorted(tmp_path.rglob("*")) == before
    for i, files in enumerate((["good/0.png", "good/1.png"], ["ok/0.png", "ok/1.png", "notes/readme.txt"])):
        root = tmp_path / "alone" / str(i)  # a normal folder beside no other folder of images still fits
        for f in files:
            save_png(image, root / f) if f.endswith(".png") else (root / f).parent.mkdir(parents=True) or \
                (root / f).write_text("text")
        assert len(vad.read_dataset(root).train) == 2


def test_contract_non_images_are_skipped_with_one_warning(dataset, tmp_path):
    data = tmp_path / "data"
    for p in vad.read_dataset(dataset).train[:6]:
        save_png(np.asarray(Image.open(p)), data / p.name)
    (data / "notes.txt").write_text("x")
    (data / "Thumbs.db").write_bytes(b"x")
    r = cli("fit", "--model", "padim", "--data", data, "--out", tmp_path / "m.pt", *TINY, "-s", "d=20")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("skipped 2 non-image file(s)") == 1
    r = cli("score", tmp_path / "m.pt", data, "-q")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 6 and r.stderr.count("skipped 2") == 1


def test_contract_truncated_image_in_fit_names_it_and_writes_nothing(dataset, tmp_path):
    data = tmp_path / "data"
    for p in vad.read_dataset(dataset).train[:5]:
        save_png(np.asarray(Image.open(p)), data / p.name)
    good = (data / vad.read_dataset(dataset).train[0].name).read_bytes()
    (data / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    r = cli("fit", "--model", "padim", "--data", data, "--out", tmp_path / "m.pt", *TINY, "-s", "d=20")
    assert r.exit_code == 2 and "zz_truncated.png" in r.stderr and not (tmp_path / "m.pt").exists()


def test_contract_truncated_and_bomb_in_score_are_reported_rest_scored(model_file, dataset, tmp_path):
    good = vad.read_dataset(dataset).test[:2]
    (tmp_path / "truncated.png").write_bytes(good[0].read_bytes()[:300])
    (tmp_path / "bomb.png").write_bytes(png_header(40000, 40000))
    inputs = [good[0], tmp_path / "truncated.png", tmp_path / "bomb.png", good[1]]
    r = cli("score", model_file, *inputs, "-q")
    assert r.exit_code == 3
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == [str(good[0]), str(good[1])]
    assert "truncated.png" in r.stderr and "bomb.png" in r.stderr and "decompression bomb" in r.stderr


def test_contract_decompression_bomb_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(12000, 12000))  # 144 Mpx: 430 MB if decoded
    with pytest.raises(vad.VadError, match="12000x12000 pixels is over vad's limit"):
        vad.read_image(tmp_path / "bomb.png", 64)
    (tmp_path / "huge.png").write_bytes(png_header(200000, 200000))  # caught by Pillow's own check
    with pytest.raises(vad.VadError, match="huge.png.*decompression bomb"):
        vad.read_image(tmp_path / "huge.png", 64)


def test_contract_formats_score_like_the_plain_image(fitted, dataset, tmp_path):
    """EXIF-rotated JPEG, CMYK JPEG, 16-bit PNG/TIFF, palette PNG and RGBA PNG of the same
    picture score like its plain 8-bit version."""
    det = fitted["patchcore"]
    grey = np.asarray(Image.open(vad.read_dataset(dataset).test[-1]).convert("L"))
    Image.fromarray(grey).save(tmp_path / "plain.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.tif")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)])).save(tmp_path / "rgba.png")
    Image.fromarray(grey).convert("RGB").save(tmp_path / "plain.jpg", quality=98)
    Image.fromarray(grey).convert("RGB").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    Image.fromarray(np.rot90(grey, -1).copy()).convert("RGB").save(tmp_path / "exif.jpg", quality=98, exif=exif)
    assert Image.open(tmp_path / "deep.tif").mode.startswith("I;16")
    scores = {r.path.name: r.score for r in vad.score_files(det, sorted(tmp_path.iterdir()))}
    for name in ("deep.png", "deep.tif", "palette.png", "rgba.png"):
        assert scores[name] == pytest.approx(scores["plain.png"], rel=1e-5), name
    for name in ("cmyk.jpg", "exif.jpg"):  # lossy: same picture, slightly different blocks
        assert scores[name] == pytest.approx(scores["plain.jpg"], rel=0.03), name


def test_contract_padim_with_fewer_images_than_d_fits_with_a_warning(dataset, tmp_path):
    paths = vad.read_dataset(dataset).train[:7]
    r = cli("fit", "--model", "padim", "--data", paths[0].parent, "--out", tmp_path / "m.pt", *TINY, "-s", "d=40")
    assert r.exit_code == 0 and r.stderr.count("rank-deficient") == 1
    det = vad.load(tmp_path / "m.pt")
    scores, maps = det.score(torch.stack([vad.read_image(p, SIZE) for p in paths[:2]]))
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()


@pytest.mark.parametrize("setting, expected", [
    ("coreset_ratio=0", "(0, 1]"), ("coreset_ratio=1.5", "(0, 1]"), ("coreset_ratio=lots", "expected float"),
    ("bogus=1", "coreset_ratio="), ("num_neighbors=2.5", "expected int")])
def test_contract_bad_settings_are_usage_errors(dataset, tmp_path, setting, expected):
    r = cli("fit", "--model", "patchcore", "--data", dataset, "--out", tmp_path / "m.pt", *TINY, "-s", setting)
    assert r.exit_code == 2 and expected in r.stderr and not (tmp_path / "m.pt").exists()


def test_contract_bad_model_files_are_one_line_errors(model_file, dataset, tmp_path):
    data = model_file.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:1000])
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"not": "vad"}, tmp_path / "other.pt")
    checkpoint = torch.load(model_file, weights_only=True)
    checkpoint["format_version"] = 99
    torch.save(checkpoint, tmp_path / "v99.pt")
    image = vad.read_dataset(dataset).test[0]
    for name, expected in [("missing.pt", "does not exist"), ("cut.pt", "not a vad model"),
                           ("half.pt", "not a vad model"), ("text.pt", "not a vad model"),
                           ("other.pt", "not a vad model"), ("v99.pt", "format version 99")]:
        r = cli("score", tmp_path / name, image)
        assert r.exit_code == 2 and expected in r.stderr and r.stderr.count("\n") == 1 and not r.stdout, name


def test_contract_malicious_model_file_never_runs_code(dataset, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    torch.save({"format": "vad-model", "format_version": vad.FORMAT_VERSION, "payload": Exploit()},
               tmp_path / "evil.pt", pickle_module=pickle)
    r = cli("score", tmp_path / "evil.pt", vad.read_dataset(dataset).test[0])
    assert r.exit_code == 2 and "not a vad model file (refused unsafe content)" in r.stderr and not marker.exists()


def test_contract_cuda_without_cuda(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["fit", "--model", "padim", "--data", dataset, "--out", tmp_path / "m.pt", "--backbone", "resnet18",
            "--weights", "none", "--image-size", SIZE, "-q", "-s", "d=20"]
    r = cli(*args, "--device", "cuda")
    assert r.exit_code == 2 and "no CUDA device" in r.stderr and not (tmp_path / "m.pt").exists()
    assert cli(*args, "--device", "auto").exit_code == 0
    assert vad.load(tmp_path / "m.pt").device.type == "cpu"


@pytest.mark.parametrize("failure", ["interrupt in fit", "crash in fit", "corrupt image", "interrupt in save",
                                     "disk full", "disk full in torch's zip writer"])
def test_contract_failed_fit_keeps_the_old_file_and_leaves_nothing(dataset, tmp_path, monkeypatch, failure):
    import errno
    data = tmp_path / "data"
    for p in vad.read_dataset(dataset).train[:6]:
        save_png(np.asarray(Image.open(p)), data / p.name)
    out = tmp_path / "m.pt"
    out.write_bytes(b"the old model")

    def broken_fit(self, batches, seed=0):
        next(iter(batches))
        raise KeyboardInterrupt if failure == "interrupt in fit" else RuntimeError("backbone exploded")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a model")
        if failure == "interrupt in save":
            raise KeyboardInterrupt
        if failure == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device")
        # what torch.save raises when the disk fills under its zip writer (seen on a 5 MB tmpfs)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    if failure.endswith("in fit"):
        monkeypatch.setattr(vad.PaDiM, "fit", broken_fit)
    elif failure == "corrupt image":
        (data / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    else:
        monkeypatch.setattr(torch, "save", broken_save)
    r = cli("fit", "--model", "padim", "--data", data, "--out", out, "--force", *TINY, "-s", "d=20")
    assert r.exit_code != 0
    if failure == "corrupt image":
        assert r.exit_code == 2 and "zz_corrupt.png" in r.stderr and r.stderr.count("\n") == 1
    if failure.startswith("disk full"):
        errors = [line for line in r.stderr.splitlines() if not line.startswith("warning:")]
        assert r.exit_code == 2 and len(errors) == 1 and str(out) in errors[0]
        assert ("No space left on device" if failure == "disk full" else "file write failed") in r.stderr
    assert out.read_bytes() == b"the old model" and sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.pt"]


def test_contract_failed_or_refused_update_keeps_the_old_file(fitted, dataset, tmp_path):
    train = vad.read_dataset(dataset).train
    data = copy_images(train[:4], tmp_path / "new")
    for name in ("padim", "patchcore", "efficientad"):
        vad.save(fitted[name], tmp_path / f"{name}.pt")
    cases = {  # model, extra options, expected in the one error line
        "a trained detector": ("efficientad", [], "efficientad models cannot be updated"),
        "another image size": ("patchcore", ["--image-size", 32], "drop --image-size"),
        "a setting": ("patchcore", ["-s", "coreset_ratio=0.5"], "drop -s"),
        "no --data": ("patchcore", [None], "needs --data"),
        "a truncated image": ("patchcore", [], "zz_truncated.png"),
    }
    for case, (name, extra, message) in cases.items():
        if case == "a truncated image":
            (data / "zz_truncated.png").write_bytes(train[0].read_bytes()[:100])
        model = tmp_path / f"{name}.pt"
        before = model.read_bytes()
        options = [] if extra == [None] else ["--data", data, *extra]
        r = cli("fit", "--update", model, *options, "--device", "cpu", "-q")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (case, r.output)
        assert model.read_bytes() == before, case
        assert sorted(p.name for p in tmp_path.iterdir()) == ["efficientad.pt", "new", "padim.pt", "patchcore.pt"]


def test_contract_update_or_calibrate_of_a_file_being_changed_is_refused(fitted, dataset, tmp_path):
    """Two `fit --update` of one file at once both exited 0 and one update was lost: while
    one holds the file, a second update or calibrate is refused in one line, and nothing
    changes. A file renamed over the held one (the first one's result) is free."""
    model = tmp_path / "m.pt"
    vad.save(fitted["patchcore"], model)
    before = model.read_bytes()
    data = copy_images(vad.read_dataset(dataset).train[:3], tmp_path / "new")
    holder = os.open(model, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what an update in progress holds
    try:
        for args in (["fit", "--update", model, "--data", data], ["calibrate", model, "--good", data]):
            r = cli(*args, "--device", "cpu", "-q")
            assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
            assert "being changed by another vad command" in r.stderr and model.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "new"]
        (tmp_path / "copy.pt").write_bytes(before)
        os.replace(tmp_path / "copy.pt", model)  # as the holder's save would: a new file at the path
        r = cli("fit", "--update", model, "--data", data, "--device", "cpu", "-q")
        assert r.exit_code == 0 and vad.load(model).info["added"] == 3, r.output
    finally:
        os.close(holder)


@pytest.mark.parametrize("name", list(vad.DETECTORS))
def test_contract_same_seed_gives_bitwise_identical_files_and_scores(name, fitted, dataset, tmp_path):
    """Same machine, same threads, same command and seed: the same .pt, byte for byte, and
    the same scores (the session's fixture is the first fit, the CLI the second); another
    seed gives another model."""
    vad.save(fitted[name], tmp_path / "a.pt", fitted[name].info)  # the CLI saves the same info
    r = cli("fit", "--model", name, "--data", dataset, "--out", tmp_path / "b.pt", *TINY,
            *sum([["-s", s] for s in FAST[name]], []))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    scores = [[json.loads(x)["score"] for x in cli("score", tmp_path / f"{run}.pt", dataset / "test", "--json",
                                                   "-q").stdout.splitlines()] for run in "ab"]
    assert scores[0] == scores[1] and len(scores[0]) == 12
    other = fit_tiny(name, dataset, seed=1)
    assert any(not torch.equal(x, y) for x, y in zip(fitted[name].state_dict().values(), other.state_dict().values()))


def test_contract_exit_codes_and_fail_on_anomaly(model_file, dataset):
    ds = vad.read_dataset(dataset)
    defects = [p for p, y in zip(ds.test, ds.labels) if y]
    r = cli("score", model_file, *defects, "--fail-on-anomaly", "-q")
    assert r.exit_code == 1 and "anomalous" in r.stdout
    assert cli("score", model_file, *defects, "-q").exit_code == 0
    help_text = cli("score", "--help").stdout
    assert "Exit status" in help_text and "--fail-on-anomaly" in help_text

def test_contract_outputs_never_replace_inputs(model_file, dataset, tmp_path):
    images = tmp_path / "images"
    for p in vad.read_dataset(dataset).test[:3]:
        save_png(np.asarray(Image.open(p)), images / "sub" / p.name)
    before = {p: p.read_bytes() for p in images.rglob("*.png")}
    for args in (["--heatmaps", images], ["--maps", images / "sub"], ["--heatmaps", images / "sub" / "new"]):
        r = cli("score", model_file, images, *args, "-q")
        assert r.exit_code == 2 and "holds the images being scored" in r.stderr and r.stderr.count("\n") == 1
    listed = sorted(before)
    r = cli("score", model_file, *listed, "--heatmaps", images / "sub", "-q")  # the folder of listed files
    assert r.exit_code == 2 and not r.stdout
    assert {p: p.read_bytes() for p in images.rglob("*.png")} == before and not (images / "sub" / "new").exists()
    r = cli("score", model_file, *listed, "--heatmaps", tmp_path / "heat", "-q")  # elsewhere: fine
    assert r.exit_code == 0 and len(list((tmp_path / "heat").glob("*.png.png"))) == 3
    # links inside DIR that lead back into the inputs: a folder, and a file named like an output
    save_png(np.asarray(Image.open(listed[0])), images / "top.png")
    (images / "sub" / (listed[0].name + ".png")).write_bytes(b"an input named like an output")
    before = {p: p.read_bytes() for p in images.rglob("*.png")}
    (tmp_path / "via").mkdir()
    (tmp_path / "via" / "sub").symlink_to(images / "sub")
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "top.png.png").symlink_to(images / "top.png")
    for out, inputs in ((tmp_path / "via", [images]), (tmp_path / "file", [images / "top.png"])):
        r = cli("score", model_file, *inputs, "--heatmaps", out, "-q")
        assert r.exit_code == 2 and "through a link" in r.stderr and not r.stdout, out
    assert {p: p.read_bytes() for p in images.rglob("*.png")} == before


def test_contract_fit_out_replaces_only_vad_models(dataset, tmp_path):
    data = tmp_path / "data"
    for p in vad.read_dataset(dataset).train[:6]:
        save_png(np.asarray(Image.open(p)), data / p.name)
    image, script = data / "000.png", tmp_path / "some_script.py"
    image_bytes = image.read_bytes()
    script.write_text("print('precious')\n")
    fit_args = ["fit", "--model", "padim", "--data", data, *TINY, "-s", "d=8"]
    for out in (image, script, tmp_path):
        r = cli(*fit_args, "--out", out)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and str(out) in r.stderr, out
    assert image.read_bytes() == image_bytes and script.read_text() == "print('precious')\n"
    r = cli(*fit_args, "--out", image, "--force")
    assert r.exit_code == 2 and "training images" in r.stderr and image.read_bytes() == image_bytes
    elsewhere = tmp_path / "elsewhere.png"  # a training image reached through a link in the data folder
    elsewhere.write_bytes(image_bytes)
    (data / "linked.png").symlink_to(elsewhere)
    r = cli(*fit_args, "--out", elsewhere, "--force")
    assert r.exit_code == 2 and "training images" in r.stderr and elsewhere.read_bytes() == image_bytes
    (data / "linked.png").unlink()
    model = tmp_path / "m.pt"
    assert cli(*fit_args, "--out", model).exit_code == 0 and vad.is_vad_model(model)
    assert cli(*fit_args, "--out", model, "--seed", "1").exit_code == 0  # a vad model may be replaced
    assert cli(*fit_args, "--out", script, "--force").exit_code == 0 and vad.is_vad_model(script)
    assert not vad.is_vad_model(image) and not vad.is_vad_model(tmp_path / "missing.pt")


def test_contract_outputs_keep_the_source_extension(model_file, dataset, tmp_path):
    array = np.asarray(Image.open(vad.read_dataset(dataset).test[0]))
    for ext in ("png", "jpg", "bmp"):
        Image.fromarray(array).save(tmp_path / "in" / f"a.{ext}") if (tmp_path / "in").exists() else \
            ((tmp_path / "in").mkdir(), Image.fromarray(array).save(tmp_path / "in" / f"a.{ext}"))
    r = cli("score", model_file, tmp_path / "in", "--json", "--heatmaps", tmp_path / "h", "--maps", tmp_path / "m",
            "-q")
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(Path(x["heatmap"]).name for x in records) == ["a.bmp.png", "a.jpg.png", "a.png.png"]
    assert sorted(Path(x["map"]).name for x in records) == ["a.bmp.npy", "a.jpg.npy", "a.png.npy"]
    for x in records:  # each record names the file written for it
        assert Path(x["heatmap"]).name.startswith(Path(x["path"]).name) and Path(x["heatmap"]).exists()
        assert np.load(x["map"]).shape == array.shape[:2]
    assert len(set(Path(x["heatmap"]).read_bytes() for x in records)) >= 2  # jpg differs from png


def test_contract_sigterm_and_sigkill_leave_no_temporary_files(dataset, tmp_path):
    import signal
    target = tmp_path / "m.pt"
    script = ("import sys, time, torch, vad\n"
              "def slow_save(obj, f, *args, **kwargs):\n"
              "    f.write(b'half a model')\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n"
              "torch.save = slow_save\n"
              "sys.argv = ['vad.py', 'fit', '--model', 'padim', '--out'] + sys.argv[1:]\n"
              "vad.main()\n")
    args = [str(target), "--data", str(dataset / "train" / "good"), *map(str, TINY), "-s", "d=8"]
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=Path(vad.__file__).parent)
    assert child.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.glob(".m.pt.*.tmp"))) == 1
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM and "Traceback" not in child.stderr.read()
    assert list(tmp_path.iterdir()) == []
    # What a SIGKILL leaves: a temporary file of a process that no longer runs.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".m.pt.{dead.pid}.0123abcd.tmp", tmp_path / f".m.pt.{os.getpid()}.0123abcd.tmp"
    others = [tmp_path / f".x.pt.{dead.pid}.0123abcd.tmp", tmp_path / ".m.pt.\u00b2.0123abcd.tmp",
              tmp_path / ".m.pt.99999999999999999999.0123abcd.tmp", tmp_path / ".m.pt.\u0661\u0662.0123abcd.tmp"]
    for f in (stale, live, *others):
        f.write_bytes(b"partial")
    (tmp_path / f".m.pt.{dead.pid}.89abcdef.tmp").mkdir()  # a folder is never ours
    vad.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert target.read_bytes() == b"new" and not stale.exists() and live.exists()
    assert all(f.exists() for f in others) and (tmp_path / f".m.pt.{dead.pid}.89abcdef.tmp").is_dir()


def test_contract_extreme_aspect_ratios_stay_small_in_memory(dataset, tmp_path):
    save_png(np.full((1, 200_000, 3), 128.0), tmp_path / "line.png")
    script = ("import resource, sys, vad\n"
              "model = vad.fit(sys.argv[2:6], 'padim', backbone='resnet18', weights='none', image_size=64,\n"
              "                resize='crop', device='cpu', settings=['d=8'], holdout=0.25)\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "r = next(vad.score_files(model, [sys.argv[1]], desc=None))\n"
              "assert r.error is None and r.anomaly_map.shape == (64, 64), r.error\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    train = [str(p) for p in vad.read_dataset(dataset).train[:4]]
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "line.png"), *train], capture_output=True,
                         text=True, cwd=Path(vad.__file__).parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 200  # MB more than fitting took; resizing the whole 64 x 12.8 M line took 9 GB
    # crop resizes only what lands in the frame: the same pixels as resizing all and cutting
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8))
    h, w, top, left = vad.placement((90, 200), (64, 64), "crop")
    assert (h, w, top, left) == (64, 142, 0, -39)
    whole = np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.float64)[:, 39:103]
    part, top, left = vad._resized_for_frame(image, (64, 64), "crop", Image.BILINEAR)
    assert (top, left) == (0, 0) and np.abs(np.asarray(part, dtype=np.float64) - whole).max() <= 1
    with pytest.raises(vad.VadError, match="limit"):
        vad.parse_size("16384x16384")


def test_contract_heat_maps_are_bounded_and_failed_writes_keep_old_files(model_file, dataset, tmp_path, monkeypatch):
    wide = tmp_path / "in" / "wide.png"
    save_png(np.random.default_rng(0).uniform(0, 255, (60, 3000, 3)), wide)
    r = cli("score", model_file, wide, "--heatmaps", tmp_path / "h", "--maps", tmp_path / "m", "-q")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "h" / "wide.png.png").size == (2048, 41)  # drawn at most 2048 px wide
    assert np.load(tmp_path / "m" / "wide.png.npy").shape == (60, 3000)  # maps keep the image's size
    older = (tmp_path / "h" / "wide.png.png").read_bytes()  # an older heat map (vad's: others are never replaced)
    monkeypatch.setattr(vad, "heatmap_png", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    r = cli("score", model_file, wide, "--heatmaps", tmp_path / "h", "-q")
    assert r.exit_code == 3 and "No space left" in r.stderr
    assert (tmp_path / "h" / "wide.png.png").read_bytes() == older  # untouched, not deleted
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["wide.png.png"]  # no temporary left
    # an extreme crop leaves less than a pixel of the image inspected: a map still comes back
    m = vad.map_to_source(np.ones((64, 64), np.float32), (1, 200_000), vad.Framing((64, 64), "crop"))
    assert m.shape == (1, 200_000) and np.isfinite(m).sum() >= 1


def crafted(model_file, tmp_path, name, change, digest=True):
    """A copy of model_file with `change` applied to its checkpoint and, if digest, the
    checksum recomputed, as an attacker who read vad.py would."""
    checkpoint = torch.load(model_file, weights_only=True)
    change(checkpoint)
    if digest:
        checkpoint["sha256"] = vad._digest(checkpoint)
    torch.save(checkpoint, tmp_path / name)
    return tmp_path / name


def test_contract_crafted_model_files_are_refused_before_use(model_file, fitted, dataset, tmp_path):
    import zipfile
    image = vad.read_dataset(dataset).test[0]

    def setter(*path, value):
        def change(c):
            for k in path[:-1]:
                c = c[k]
            c[path[-1]] = value(c[path[-1]]) if callable(value) else value
        return change
    cases = {
        "huge frame": setter("framing", "size", value=[16384, 16384]),
        "unknown key": setter("payload", value=torch.zeros(1000)),
        "int3 precision": setter("precision", value="int3"),
        "list precision": setter("precision", value=["fp32"]),
        "string setting": setter("config", "d", value="20"),
        "float64 mean": setter("state_dict", "mean", value=lambda t: t.double()),
        "empty mean": setter("state_dict", "mean", value=torch.empty(0)),
        "NaN mean": setter("state_dict", "mean", value=lambda t: t.fill_(float("nan"))),
        "channel out of range": setter("state_dict", "channels", value=lambda t: t + 10_000),
        "input size off": setter("image_size", value=[32, 32]),
        "stride-0 view": setter("state_dict", "mean", value=lambda t: torch.zeros(1).expand(*t.shape)),
        "shared references in info": setter("info", value=lambda v: {"x": [[[0] * 10] * 10] * 10}),
        "float tile": setter("framing", "tile", value=64.0),
        "tensor version": setter("format_version", value=torch.tensor([4, 4])),
        "held-out values of unequal counts": setter("state_dict", "held_out_maxima", value=lambda t: t[1:]),
    }
    for name, change in cases.items():
        r = cli("score", crafted(model_file, tmp_path, "c.pt", change), image)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and not r.stdout, (name, r.output)
        assert "Traceback" not in r.output
    vad.save(fitted["patchcore"], tmp_path / "patchcore.pt")
    r = cli("score", crafted(tmp_path / "patchcore.pt", tmp_path, "c.pt",
                             setter("state_dict", "bank_order", value=torch.zeros_like)), image)
    assert r.exit_code == 2 and "not a permutation" in r.stderr
    for special in ("/dev/zero", tmp_path):
        r = cli("score", special, image)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, special
    # precision is covered by the checksum: changing it alone is detected
    r = cli("score", crafted(model_file, tmp_path, "p.pt", setter("precision", value="bf16"), digest=False), image)
    assert r.exit_code == 2 and "checksum" in r.stderr
    # a small file that would inflate to far more than it occupies
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(tmp_path / "z.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    r = cli("score", tmp_path / "z.pt", image)
    assert r.exit_code == 2 and "compressed" in r.stderr


def test_contract_tsv_paths_are_escaped_and_stdin_can_be_nul_separated(model_file, dataset, tmp_path):
    array = np.asarray(Image.open(vad.read_dataset(dataset).test[0]))
    names = ["tab\there.png", "new\nline.png", "back\\slash.png", "plain.png"]
    for n in names:
        save_png(array, tmp_path / "in" / n)
    paths = [tmp_path / "in" / n for n in names]
    r = cli("score", model_file, *paths, "-q")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 4
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert all(len(row) == 4 for row in rows)
    assert rows[0][0] == str(paths[0]).replace("\t", "\\t") and rows[1][0].endswith("new\\nline.png")
    assert rows[2][0].endswith("back\\\\slash.png")
    r = cli("score", model_file, "-", "-0", "--json", "-q", input="\0".join(map(str, paths)).encode() + b"\0")
    assert r.exit_code == 0 and [json.loads(line)["path"] for line in r.stdout.splitlines()] == list(map(str, paths))
    odd = [tmp_path / "in" / n for n in ("trailing space.png ", "form\ffeed.png")]  # names a line may hold
    for p in odd:
        p.write_bytes(paths[3].read_bytes())
    r = cli("score", model_file, "-", "--json", "-q", input="".join(f"{p}\r\n" for p in odd))
    assert r.exit_code == 0 and [json.loads(line)["path"] for line in r.stdout.splitlines()] == list(map(str, odd))
    lines = f"{paths[3]}\nbad\0name.png\n{paths[3]}\n"
    r = cli("score", model_file, "-", "-q", input=lines)  # NUL in a line: that line's error, the rest scored
    assert r.exit_code == 3 and len(r.stdout.splitlines()) == 2 and "Traceback" not in r.output
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 2  # the file, the count


def test_contract_unwritable_outputs_are_reported_and_the_rest_goes_on(model_file, dataset, tmp_path):
    test = vad.read_dataset(dataset).test[:3]
    heat = tmp_path / "heat"
    (heat / (test[1].name + ".png")).mkdir(parents=True)  # the second image's heat map cannot be written
    r = cli("score", model_file, *test, "--heatmaps", heat, "-q")
    assert r.exit_code == 3 and len(r.stdout.splitlines()) == 3
    errors = r.stderr.splitlines()
    assert len(errors) == 2 and test[1].name in errors[0] and "could not be written" in errors[1]
    assert (heat / (test[0].name + ".png")).exists() and (heat / (test[2].name + ".png")).exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    start = time.perf_counter()
    r = cli("bench", "--data", dataset, "--model", "padim", "--json", blocker / "x.json", *TINY)
    assert r.exit_code == 2 and "--json" in r.stderr and time.perf_counter() - start < 5  # before any work


def test_contract_bench_warns_about_masks_and_broken_links(dataset, tmp_path):
    data = tmp_path / "cat"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(dataset, data)
    masks = sorted((data / "ground_truth" / "defect").glob("*.png"))
    masks[0].unlink()
    Image.open(masks[1]).resize((32, 32)).save(masks[1])
    (data / "train" / "good" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    r = cli("bench", "--data", data, "--model", "padim", *TINY[:-1], "-s", "d=8")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("1 of 6 defective test images have no mask") == 1
    assert r.stderr.count("1 mask(s)") == 1 and "differ in size" in r.stderr
    assert r.stderr.count("1 of them broken link(s)") == 1


# -----------------------------------------------------------------------------
# Hardening, third pass (issue 24): each test failed on the main it was written against


def float_tiff(path, value, size=SIZE):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.float32), mode="F").save(path)
    return path


def strict_json(line):
    """json.loads that refuses NaN and Infinity, as strict parsers (the serve page's, jq) do."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a JSON line"))


def test_contract_outputs_never_overwrite_inputs_or_files_vad_did_not_write(model_file, dataset, tmp_path):
    data = vad.read_dataset(dataset)
    image, mask = data.train[0], next(m for m in data.masks if m)
    for target in (image, mask, model_file):  # bench --json onto a training image, a mask, a model file
        before = target.read_bytes()
        r = cli("bench", "--data", dataset, "--model", "padim", "--json", target, *TINY)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and target.read_bytes() == before, (target, r.output)
    rows = tmp_path / "earlier.json"  # an earlier bench result may be replaced; other JSON may not
    rows.write_text(json.dumps([{"category": "tiles", "model": "padim", "image_auroc": 1.0}]))
    vad.check_output(rows, "--json", vad.is_bench_json, "bench results", [dataset])
    other = tmp_path / "other.json"
    other.write_text('{"category": "tiles"}')
    with pytest.raises(click.ClickException):
        vad.check_output(other, "--json", vad.is_bench_json, "bench results", [dataset])
    # calibrate --out onto one of the good images it reads
    good = tmp_path / "good"
    for p in data.test[:3]:
        save_png(np.asarray(Image.open(p)), good / p.name)
    before = (good / data.test[0].name).read_bytes()
    r = cli("calibrate", model_file, "--good", good, "--out", good / data.test[0].name, "-q")
    assert r.exit_code == 2 and "inputs" in r.stderr and (good / data.test[0].name).read_bytes() == before
    # a.png's mask and the heat map of an input named a.png.mask land on the same name
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(before)
    (tmp_path / "in" / "a.png.mask").write_bytes(before)
    r = cli("score", model_file, tmp_path / "in" / "a.png", tmp_path / "in" / "a.png.mask", "--heatmaps",
            tmp_path / "out", "--masks", tmp_path / "out", "-q")
    assert r.exit_code == 2 and "two outputs" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_contract_non_finite_pixels_are_an_unreadable_image_and_never_reach_json(value, fitted, dataset, tmp_path):
    good = vad.read_dataset(dataset).test[:2]
    bad = float_tiff(tmp_path / "nan.tif", value)
    for name in ("padim", "patchcore"):
        vad.save(fitted[name], tmp_path / f"{name}.pt")
        r = cli("score", tmp_path / f"{name}.pt", good[0], bad, good[1], "--json", "-q")
        assert r.exit_code == 3 and "Traceback" not in r.output, r.output
        lines = [strict_json(line) for line in r.stdout.splitlines()]
        assert [line["path"] for line in lines] == [str(good[0]), str(good[1])]
        assert "NaN or infinite pixels" in r.stderr and str(bad) in r.stderr
    # fit on a folder that holds one: refused in one line, nothing written
    folder = tmp_path / "train"
    for p in vad.read_dataset(dataset).train[:6]:
        save_png(np.asarray(Image.open(p)), folder / p.name)
    float_tiff(folder / "zz.tif", value)
    r = cli("fit", "--model", "padim", "--data", folder, "--out", tmp_path / "f.pt", "-s", "d=20", *TINY)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "f.pt").exists(), r.output


def test_contract_non_finite_model_outputs_are_errors_and_never_written(fitted, dataset, tmp_path, monkeypatch):
    detector = fitted["padim"]
    paths = vad.read_dataset(dataset).test[:2]
    monkeypatch.setattr(vad.PaDiM, "score", lambda self, x: (torch.full((len(x),), float("nan")),
                                                            torch.zeros(len(x), SIZE, SIZE)))
    results = list(vad.score_files(detector, paths, desc=None))
    assert all(r.error and "NaN or infinite" in r.error for r in results)
    monkeypatch.undo()
    broken = vad.load(vad.save(detector, tmp_path / "m.pt") or tmp_path / "m.pt")
    broken.threshold.fill_(float("nan"))
    with pytest.raises(vad.VadError, match="NaN or infinite"):
        vad.save(broken, tmp_path / "nan.pt")
    assert not (tmp_path / "nan.pt").exists()


def test_contract_calibrate_refuses_non_finite_targets_and_thresholds(model_file, dataset, tmp_path):
    good = tmp_path / "good"
    for p in vad.read_dataset(dataset).test[:4]:
        save_png(np.asarray(Image.open(p)), good / p.name)
    before = model_file.read_bytes()
    for option in ("--threshold", "--pixel-threshold"):  # score's own: a usage error, never a NaN comparison
        r = cli("score", model_file, *sorted(good.iterdir())[:1], option, "nan", "-q")
        assert r.exit_code == 2 and "finite" in r.stderr and not r.stdout, (option, r.output)
    for frr in ("nan", "inf"):
        r = cli("calibrate", model_file, "--good", good, "--target-frr", frr, "-q")
        assert r.exit_code == 2 and "Traceback" not in r.output and ("finite" in r.stderr or "range" in r.stderr)
    float_tiff(good / "zz.tif", np.nan)
    r = cli("calibrate", model_file, "--good", good, "-q")
    assert r.exit_code == 2 and "NaN" in r.stderr and model_file.read_bytes() == before, r.output


def naive_depth(obj):
    """Containers within containers, by recursion over the object itself (an empty
    container holds nothing, and counts as a scalar)."""
    if isinstance(obj, dict):
        obj = [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple)) and obj:
        return 1 + max(naive_depth(v) for v in obj)
    return 0


def test_pickle_depth_matches_the_objects_own_nesting():
    cases = [1, "s", (), (1,), [(1, 2), {"a": [[]]}], {"k": {"k": {"k": (3,)}}}, [[1]] * 3, list(range(2500)),
             [[[i] for i in range(1500)]]]
    for obj in cases:
        for protocol in (2, 4):
            assert vad.pickle_depth(pickle.dumps(obj, protocol)) == naive_depth(obj), (obj, protocol)


def test_contract_a_deeply_nested_model_record_is_refused_not_a_crash(model_file, tmp_path):
    import zipfile
    checkpoint = torch.load(model_file, weights_only=True)
    checkpoint["detector"] = "DEEPMARKER"
    torch.save(checkpoint, tmp_path / "marked.pt")
    deep = tmp_path / "deep.pt"
    with zipfile.ZipFile(tmp_path / "marked.pt") as src, zipfile.ZipFile(deep, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):  # "padim" wrapped in 200,000 one-tuples (TUPLE1)
                marker = b"X" + struct.pack("<I", 10) + b"DEEPMARKER"
                assert data.count(marker) == 1
                data = data.replace(marker, b"X" + struct.pack("<I", 5) + b"padim" + b"\x85" * 200_000)
            dst.writestr(info, data)
    image = tmp_path / "x.png"
    save_png(np.zeros((SIZE, SIZE, 3)), image)
    # a subprocess: on a vad that hashes the value, the process dies by SIGSEGV
    r = subprocess.run([sys.executable, vad.__file__, "score", deep, image], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "nests containers" in r.stderr and r.stderr.count("\n") == 1, (r.returncode,
                                                                                                r.stderr[-500:])


def test_contract_framing_and_settings_are_range_checked_on_load_and_fit(model_file, fitted, dataset, tmp_path):
    image = vad.read_dataset(dataset).test[0]

    def change(**values):
        def apply(c):
            for key, value in values.items():
                where = c
                for k in key.split(".")[:-1]:
                    where = where[k]
                where[key.split(".")[-1]] = value
        return apply
    vad.save(fitted["patchcore"], tmp_path / "pc.pt")
    cases = [
        (model_file, change(framing={"size": [64, 64000], "tile": 64, "overlap": 0.99, "resize": "fit"})),
        (model_file, change(framing={"size": [64, 64], "tile": None, "overlap": float("nan"), "resize": "fit"})),
        (model_file, change(**{"config.blur_sigma": 1e6})),
        (model_file, change(**{"info.seed": 2**70})),
        (tmp_path / "pc.pt", change(**{"config.num_neighbors": 10**9})),
        (tmp_path / "pc.pt", change(**{"config.search_probe": 0})),
        (tmp_path / "pc.pt", change(**{"state_dict.cell_radii": -torch.ones(
            len(fitted["patchcore"].cell_radii))})),
        (tmp_path / "pc.pt", change(**{"state_dict.bank_parts": torch.tensor(-3)})),
    ]
    for i, (source, apply) in enumerate(cases):
        r = cli("score", crafted(source, tmp_path, f"c{i}.pt", apply), image)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.output, (i, r.output)
    start = time.perf_counter()
    for args in (["--image-size", "2048", "--tile", "32", "--tile-overlap", "0.99"], ["-s", "blur_sigma=nan"],
                 ["--seed", str(2**70)], ["--tile-overlap", "nan", "--tile", "32"]):
        r = cli("fit", "--model", "padim", "--data", dataset, "--out", tmp_path / "f.pt", "--backbone", "resnet18",
                "--weights", "none", "-q", *args)
        assert r.exit_code == 2 and not (tmp_path / "f.pt").exists() and "Traceback" not in r.output, (args, r.output)
    assert time.perf_counter() - start < 10  # refused before any work
    # native size: the tiles of each image are bounded one image at a time
    big = tmp_path / "big.png"
    save_png(np.zeros((2000, 2000, 3)), big)
    framing = vad.Framing(None, "fit", 32, 0.99)
    frames = list(vad.read_frames([big, image], framing))
    assert "tiles" in frames[0].error and frames[1].error is None


def test_contract_onnx_external_data_and_nested_metadata_are_refused(exported, tmp_path):
    import onnx
    model = onnx.load(exported["padim"])
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.bin", size_threshold=0)
    assert (tmp_path / "big.bin").exists()
    r = cli("score", tmp_path / "ext.onnx", tmp_path / "big.bin")
    assert r.exit_code == 2 and "external data" in r.stderr and r.stderr.count("\n") == 1, r.output
    model = onnx.load(exported["padim"])
    for entry in model.metadata_props:
        if entry.key == "vad.info":
            entry.value = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.onnx").write_bytes(model.SerializeToString())
    r = cli("score", tmp_path / "deep.onnx", tmp_path / "big.bin")
    assert r.exit_code == 2 and "Traceback" not in r.output and r.stderr.count("\n") == 1, r.output


def test_contract_info_prints_a_crafted_history_safely(model_file, tmp_path):
    for i, history in enumerate(['[{"event": "fit\\u001b[2J\\u001b]0;owned\\u0007", "x": "a\\nb"}]', "[" * 4000]):
        def change(c):
            c["info"]["history"] = history
        r = cli("info", crafted(model_file, tmp_path, f"h{i}.pt", change))
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", r.stdout)  # no escape sequence, no injected line
        if i == 0:
            assert "\\x1b[2J" in r.stdout and "a\\x0ab" in r.stdout


def test_contract_fresh_hostile_pass_findings(model_file, fitted, dataset, tmp_path):
    """What a second hostile pass found after the first fixes (issue 24): each refused in
    one line with nothing lost."""
    data = vad.read_dataset(dataset)
    image = data.test[0]
    # --force never replaces an input: here the --weights file
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pth")
    before = (tmp_path / "w.pth").read_bytes()
    r = cli("fit", "--model", "padim", "--data", dataset, "--backbone", "resnet18", "--weights", tmp_path / "w.pth",
            "--image-size", SIZE, "-s", "d=20", "--out", tmp_path / "w.pth", "--force", "-q")
    assert r.exit_code == 2 and "input" in r.stderr and (tmp_path / "w.pth").read_bytes() == before, r.output
    # a heat map or map never lands on the model file being scored, nor on a file vad did not write
    out = tmp_path / "o"
    out.mkdir()
    trap = out / f"{image.name}.png"
    trap.write_bytes(model_file.read_bytes())
    r = cli("score", trap, image, "--heatmaps", out, "-q")
    assert r.exit_code == 2 and "model file" in r.stderr and trap.read_bytes() == model_file.read_bytes()
    trap.write_text("precious")
    r = cli("score", model_file, image, "--heatmaps", out, "-q")
    assert r.exit_code == 2 and "not a heat map" in r.stderr and trap.read_text() == "precious"
    trap.unlink()
    for _ in range(2):  # vad's own outputs are replaced on a rerun
        assert cli("score", model_file, image, "--heatmaps", out, "--maps", out / "m", "-q").exit_code == 0
    r = cli("score", model_file, image, "--heatmaps", tmp_path / "w.pth", "-q")  # a file, not a folder
    assert r.exit_code == 2 and "is a file" in r.stderr
    # an --out that another command is changing is locked as its MODEL_FILE is
    target = tmp_path / "held.pt"
    target.write_bytes(model_file.read_bytes())
    holder = os.open(target, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    good = copy_images(data.train[:3], tmp_path / "good")
    try:
        for args in (["calibrate", model_file, "--good", good, "--out", target],
                     ["fit", "--model", "padim", "--data", dataset, "--out", target, "-s", "d=20", *TINY]):
            r = cli(*args)
            assert r.exit_code == 2 and "being changed" in r.stderr and target.read_bytes() == model_file.read_bytes()
    finally:
        os.close(holder)
    # fit and calibrate write .pt files: a .onnx name is for exports
    r = cli("fit", "--model", "padim", "--data", dataset, "--out", tmp_path / "x.onnx", "-s", "d=20", *TINY)
    assert r.exit_code == 2 and ".onnx" in r.stderr and not (tmp_path / "x.onnx").exists()
    # calibrate: a rate too small to mean anything; a tail with no spread says so
    for frr in ("5e-324", "1e-300"):
        r = cli("calibrate", model_file, "--good", good, "--target-frr", frr, "-q")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and len(r.stderr) < 300, r.output
    one = copy_images(data.train[:1], tmp_path / "one")
    r = cli("calibrate", model_file, "--good", one, "--out", tmp_path / "one.pt", "-q")
    assert r.exit_code == 0 and "no spread" in r.stderr, r.output
    # a crafted top-level threshold; a name with a right-to-left override and ESC in an error line
    r = cli("score", crafted(model_file, tmp_path, "t.pt", lambda c: c.update(threshold=float("nan"))), image)
    assert r.exit_code == 2 and "threshold" in r.stderr
    odd = tmp_path / "a\u202e\x1b[2Jb"
    r = cli("fit", "--data", odd, "-q")
    assert r.exit_code == 2 and "\x1b" not in r.stderr and "\u202e" not in r.stderr and "\\x1b" in r.stderr
    # score: the summary when nothing could be scored
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = subprocess.run([sys.executable, vad.__file__, "score", model_file, tmp_path / "bad.png"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3 and "no image was scored" in r.stderr


def test_contract_bench_on_defects_without_masks_has_no_pixel_metrics(tmp_path):
    root = tmp_path / "bb"
    make_dataset(root, n_train=8, n_good=0, n_bad=3)
    for mask in (root / "ground_truth").rglob("*.png"):
        mask.unlink()
    r = cli("bench", "--model", "padim", "--data", root, "--json", tmp_path / "b.json", "-s", "d=20", *TINY)
    assert r.exit_code == 0, r.output
    row = strict_json((tmp_path / "b.json").read_text())[0]
    assert row["pixel_auroc"] is None and row["image_auroc"] is None  # one class only: undefined, never NaN


def test_contract_smaller_rows_of_the_third_hostile_pass(model_file, dataset, tmp_path, monkeypatch):
    import zipfile
    image = vad.read_dataset(dataset).test[0]
    # a SIGKILLed run's temporary in --maps is removed by the next run
    stale = tmp_path / "maps" / f".{image.name}.npy.999999999.0badf00d.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    assert cli("score", model_file, image, "--maps", tmp_path / "maps", "-q").exit_code == 0
    assert not stale.exists() and (tmp_path / "maps" / f"{image.name}.npy").exists()
    # SIGTERM inside torch's writer: the exit status says SIGTERM, not a write error
    def interrupted(obj, path):
        vad.STOP_SIGNAL = 15
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(vad, "_torch_save", interrupted)
    with pytest.raises(SystemExit) as stop:
        vad.save(vad.load(model_file), tmp_path / "x.pt")
    assert stop.value.code == 143 and not (tmp_path / "x.pt").exists()
    monkeypatch.setattr(vad, "STOP_SIGNAL", None)
    monkeypatch.undo()
    # a name that is not UTF-8: strict JSON, its bytes in path_base64
    odd = Path(os.fsdecode(bytes(tmp_path / "in") + b"/odd\xff.png"))
    odd.parent.mkdir()
    odd.write_bytes(image.read_bytes())
    r = cli("score", model_file, odd, "--json", "-q")
    line = strict_json(r.stdout)
    line["path"].encode("utf-8")  # no lone surrogate
    assert r.exit_code == 0 and line["path"].endswith("odd\\xff.png")
    assert base64.b64decode(line["path_base64"]) == os.fsencode(odd)
    # --weights: a deflate bomb is refused before it is inflated
    torch.save({"w": torch.zeros(2**20)}, tmp_path / "w.pth")
    with zipfile.ZipFile(tmp_path / "w.pth") as src, zipfile.ZipFile(tmp_path / "bomb.pth", "w",
                                                                     zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert (tmp_path / "bomb.pth").stat().st_size < 100_000
    with pytest.raises(vad.VadError, match="compressed"):
        vad.load_backbone_weights("resnet18", tmp_path / "bomb.pth")
    # VisA's split: a short row, a NUL in a path
    visa = tmp_path / "VisA"
    (visa / "candle" / "Data" / "Images").mkdir(parents=True)
    (visa / "split_csv").mkdir()
    for rows in ("candle,train\n", "candle,train,normal,a\0b.png,\n"):
        (visa / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n" + rows)
        with pytest.raises(vad.VadError, match="line 2"):
            vad.read_dataset(visa / "candle")
    # --shard: empty, or digits that are not ASCII
    for shard in ("", "\u0661/\u0662"):
        r = cli("score", model_file, image, "--shard", shard, "-q")
        assert r.exit_code == 2 and "--shard" in r.stderr and not r.stdout, (shard, r.output)
    # Content-Length past 18 digits: too large (413), not malformed (400)
    request = vad.parse_head(b"POST /score HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1" + b"0" * 30)
    assert vad.body_length(request) > vad.MAX_UPLOAD_BYTES
    request = vad.parse_head(b"POST /score HTTP/1.1\r\nHost: localhost\r\nContent-Length: 000000000000000000000042")
    assert vad.body_length(request) == 42


# -----------------------------------------------------------------------------
# serve: the inspection page and JSON endpoint on a loopback port


@contextlib.contextmanager
def serving(models, **options):
    """An InspectionServer on a loopback port, run by a thread -> (server, base URL)."""
    srv = vad.InspectionServer(models, ("127.0.0.1", 0), **{"quiet": True, **options})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def server(fitted):
    models = {"tiles-padim": fitted["padim"], "tiles-patchcore": fitted["patchcore"]}
    with serving(models, max_bytes=200_000) as (_, url):
        yield url


def http(url, data=None, headers=None, timeout=30):
    """(status, decoded JSON or text) of a request; errors are answers, not exceptions."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, body, kind = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, body, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, (json.loads(body) if kind == "application/json" else body.decode())


def connect(url, timeout=5):
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=timeout)


def read_until_closed(s):
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(2**16):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(data):
    """An HTTP answer's bytes -> (status, headers with lower-case names, JSON or text body)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    body = body[:int(headers.get("content-length", len(body)))]
    if headers.get("content-type") == "application/json" and body:
        return int(lines[0].split()[1]), headers, json.loads(body)
    return int(lines[0].split()[1]), headers, body.decode()


def raw(url, data):
    """Send bytes as they are (what urllib would never send) and read the answer until
    the server closes the connection."""
    with connect(url) as s:
        s.sendall(data)
        return parse_answer(read_until_closed(s))


def test_serve_page_health_and_models(server, fitted):
    status, page = http(server + "/")
    assert status == 200 and "<script>" in page and 'fetch("/models")' in page
    assert "src=" not in page.replace('$("overlay").src', "") and "https://" not in page  # self-contained
    assert http(server + "/health") == (200, {"status": "ok", "models": 2, "drift": False})
    status, models = http(server + "/models")
    assert status == 200 and [m["name"] for m in models] == ["tiles-padim", "tiles-patchcore"]
    assert models[0] == {"name": "tiles-padim", "detector": "padim", "backbone": "resnet18",
                         "image_size": f"{SIZE}x{SIZE}", "resize": "fit", "tile": None,
                         "threshold": float(fitted["padim"].threshold),
                         "pixel_threshold": float(fitted["padim"].pixel_threshold)}


def test_serve_scores_raw_png_and_multipart(server, fitted, dataset):
    path = vad.read_dataset(dataset).test[-1]
    expected, maps = fitted["patchcore"].score(vad.read_image(path, SIZE)[None])
    status, result = http(server + "/score?model=tiles-patchcore&overlay=1", path.read_bytes())
    assert status == 200 and result["score"] == pytest.approx(float(expected[0]), rel=1e-6)
    assert result["threshold"] == float(fitted["patchcore"].threshold)
    assert result["verdict"] == ("anomalous" if result["score"] > result["threshold"] else "ok")
    assert result["pixel_threshold"] == float(fitted["patchcore"].pixel_threshold)
    assert (result["regions"], result["region_count"]) == tuple(json.loads(json.dumps(  # at the image's own size
        vad.defect_regions(maps[0].numpy(), float(fitted["patchcore"].pixel_threshold)))))
    header, encoded = result["overlay"].split(",", 1)
    assert header == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (SIZE, SIZE)

    boundary = "vadtestboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"part.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, result2 = http(server + "/score?model=tiles-patchcore", form,
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and result2["score"] == result["score"] and "overlay" not in result2


def test_serve_errors(server, dataset):
    status, result = http(server + "/score?model=tiles-padim", b"this is not an image")
    assert status == 400 and "cannot read image" in result["error"]
    status, result = http(server + "/score?model=tiles-padim", b"x" * 300_000)
    assert status == 413 and "limit" in result["error"]
    status, result = http(server + "/score?model=nope", vad.read_dataset(dataset).test[0].read_bytes())
    assert status == 404 and "tiles-padim" in result["error"]
    assert http(server + "/nowhere")[0] == 404
    assert http(server + "/health")[0] == 200  # still serving


def test_serve_concurrent_requests(server, fitted, dataset):
    paths = (vad.read_dataset(dataset).test * 2)[:20]
    expected = {p: float(fitted["padim"].score(vad.read_image(p, SIZE)[None])[0][0]) for p in set(paths)}
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda p: http(server + "/score?model=tiles-padim", p.read_bytes()), paths))
    assert all(status == 200 for status, _ in answers)
    for p, (_, result) in zip(paths, answers):
        assert result["score"] == pytest.approx(expected[p], rel=1e-6)


def test_serve_keeps_alive_and_answers_pipelined_requests_in_order(server, dataset):
    image = vad.read_dataset(dataset).test[0].read_bytes()
    connection = HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=10)
    for method, path, body in [("GET", "/health", None), ("POST", "/score?model=tiles-padim", image),
                               ("GET", "/nowhere", None), ("GET", "/models", None)]:
        connection.request(method, path, body)
        r = connection.getresponse()
        assert r.status in (200, 404) and json.loads(r.read())
    first = connection.sock  # one connection for all four
    assert first is not None and connection.sock is first
    connection.close()
    two = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw(server, two)
    assert answer[0] == 200 and answer[2] == {"status": "ok", "models": 2, "drift": False}


def test_serve_scores_with_an_exported_model(exported, fitted, dataset):
    """A .onnx serves as its .pt does: the same /models entry, scores to 1e-4."""
    with serving({"tiles-padim": vad.OnnxModel(exported["padim"])}) as (_, url):
        status, models = http(url + "/models")
        assert status == 200 and models[0]["threshold"] == float(fitted["padim"].threshold)
        path = vad.read_dataset(dataset).test[-1]
        status, result = http(url + "/score", path.read_bytes())
        expected = next(vad.score_files(fitted["padim"], [path], desc=None)).score
        assert status == 200 and result["score"] == pytest.approx(expected, rel=1e-4)
        metrics = http(url + "/metrics")[1]  # an export keeps no held-out scores: counts, but no drift series
        assert 'vad_verdicts_total{model="tiles-padim",verdict="' in metrics and "vad_drift{" not in metrics
    r = cli("score", exported["padim"], path)
    assert r.exit_code == 0 and "drift not checked: the model holds no held-out scores" in r.stderr


def test_cli_serve_refuses_duplicate_names(fitted, tmp_path):
    for folder in ("a", "b"):
        vad.save(fitted["padim"], tmp_path / folder / "m.pt")
    r = cli("serve", tmp_path / "a" / "m.pt", tmp_path / "b" / "m.pt")
    assert r.exit_code == 2 and "two models named 'm'" in r.stderr


def vm_kib(pid, field):
    """A process's VmRSS or VmHWM (its peak since the last reset) in KiB."""
    return int(re.search(rf"^{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_contract_serve_overlay_memory_is_bounded(model_file):
    """Two 25 Mpx overlays at once (73 kB PNGs) cost 3.3 GB each before; drawn at most
    2048 px on a side, by at most SERVE_WORKERS requests at once, they stay under 1.5 GiB."""
    server = subprocess.Popen([sys.executable, vad.__file__, "serve", model_file, "--port", "0", "-q"],
                              stderr=subprocess.PIPE, text=True)
    try:
        image = Image.new("RGB", (5000, 5000), (120, 120, 120))
        image.paste((220, 60, 40), (2000, 2000, 2600, 2300))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = re.search(r"http://[\d.]+:\d+", server.stderr.readline()).group(0)
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM from here on
        idle = vm_kib(server.pid, "VmRSS")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: http(url + "/score?overlay=1", buffer.getvalue(), timeout=60), range(2)))
        peak = vm_kib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(10)
    assert (peak - idle) * 1024 < 1.5 * 2**30
    for status, result in answers:
        assert status == 200
        assert Image.open(io.BytesIO(base64.b64decode(result["overlay"].split(",", 1)[1]))).size == (2048, 2048)


def test_contract_serve_deadlines_cut_off_slow_and_idle_connections(fitted):
    with serving({"m": fitted["padim"]}) as (srv, url):
        srv.header_seconds = srv.body_seconds = srv.idle_seconds = 0.5
        silent, short_body, idle, trickle = (connect(url) for _ in range(4))
        short_body.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

        def drip():  # a byte every 0.1 s: in time for any per-read timeout, never a whole request
            with contextlib.suppress(OSError):
                for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 50:
                    trickle.send(bytes([byte]))
                    time.sleep(0.1)
        dripping = threading.Thread(target=drip)
        start = time.monotonic()
        dripping.start()
        answers = {name: read_until_closed(s) for name, s in
                   [("silent", silent), ("short_body", short_body), ("idle", idle), ("trickle", trickle)]}
        elapsed = time.monotonic() - start
        dripping.join()
    assert answers["silent"] == b""
    assert parse_answer(answers["short_body"])[0] == 408
    assert parse_answer(answers["idle"])[:1] == (200,)  # answered, then closed once idle
    assert parse_answer(answers["trickle"])[0] == 408
    assert elapsed < 2.5


def test_contract_serve_holds_many_slow_connections_on_one_thread(fitted, capsys):
    vad.raise_open_file_limit()
    partial = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    with serving({"m": fitted["padim"]}) as (srv, url):
        threads = threading.active_count()
        slow = [connect(url) for _ in range(500)]
        for s in slow:
            s.sendall(partial)
        start = time.monotonic()
        status = http(url + "/health", timeout=5)[0]
        took = time.monotonic() - start
        assert status == 200 and took < 1
        assert threading.active_count() <= threads + vad.SERVE_WORKERS
        for s in slow:
            s.close()
    # Over the cap, the oldest connection still sending its request makes room: 20 are
    # open, /health takes the place of the first (and gives it up), 5 more that of 4 more.
    with serving({"m": fitted["padim"]}, max_connections=20, quiet=False) as (srv, url):
        first = [connect(url, timeout=1) for _ in range(20)]
        for s in first:
            s.sendall(partial)
        assert http(url + "/health")[0] == 200
        later = [connect(url) for _ in range(5)]
        assert all(read_until_closed(s) == b"" for s in first[:5])
        first[5].settimeout(0.2)
        with pytest.raises(TimeoutError):
            first[5].recv(1)
    for s in first + later:
        s.close()
    log = capsys.readouterr().err
    dropped = [line for line in log.splitlines() if "dropped" in line]
    assert "Traceback" not in log and len(dropped) == 1  # one summary line, not one per connection
    assert dropped[0].startswith("dropped 5 connection(s)")
    assert dropped[0].endswith(": 5 dropped for newer ones (over 20 open)")


def test_contract_serve_reads_a_multipart_body_in_linear_time(fitted, dataset):
    image = vad.read_dataset(dataset).test[0].read_bytes()

    def form(fields, then_image=True):
        parts = [b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(fields)]
        if then_image:
            parts.append(b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + image + b"\r\n")
        return b"".join(parts) + b"--b--\r\n"
    multipart = {"Content-Type": 'multipart/form-data; boundary="b"'}
    with serving({"m": fitted["padim"]}, max_bytes=16 * 2**20) as (srv, url):
        start = time.monotonic()
        status, answer = http(url + "/score", form(100_000), multipart, timeout=10)
        took = time.monotonic() - start
        assert status == 400 and "first 100 parts" in answer["error"] and took < 2
        assert http(url + "/score", form(99), multipart)[0] == 200  # the image as the 100th part
        assert http(url + "/score", form(3, then_image=False), multipart)[0] == 400
        status, answer = http(url + "/score", form(3), {"Content-Type": "multipart/form-data"})
        assert status == 400 and "boundary" in answer["error"]


def test_contract_serve_refuses_ambiguous_and_malformed_requests_in_json(server):
    start = b"POST /score?model=tiles-padim HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    for framing, why in [(b"Content-Length: 5\r\nContent-Length: 5\r\n", "more than one Content-Length"),
                         (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "Transfer-Encoding and Content"),
                         ("Content-Length: ²\r\n".encode(), "ASCII digits"),
                         (b" Content-Length: 5\r\n", "malformed header")]:
        status, headers, answer = raw(server, start + framing + b"\r\nhello")
        assert status == 400 and why in answer["error"]
    for method, path, allow in [("PUT", "/score", "POST"), ("DELETE", "/", "GET, HEAD"),
                                ("OPTIONS", "/health", "GET, HEAD"), ("HEAD", "/score", "POST")]:
        request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        status, headers, answer = raw(server, request.encode())
        assert status == 405 and headers["allow"] == allow and headers["content-type"] == "application/json"
        assert method == "HEAD" or path in answer["error"]
    status, headers, page = raw(server, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 200 and page == "" and int(headers["content-length"]) > 1000
    status, _, answer = raw(server, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 414 and "request line" in answer["error"]
    status, _, answer = raw(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    assert status == 431 and "headers" in answer["error"]
    status, result = http(server + "/score?model=tiles-padim", b"this is not an image")
    assert status == 400 and "cannot read image" in result["error"] and " at 0x" not in result["error"]


def test_contract_serve_client_that_closes_early_leaves_no_traceback(fitted, dataset, capsys):
    image = vad.read_dataset(dataset).test[0].read_bytes()
    head = b"POST /score?overlay=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(image)
    with serving({"m": fitted["padim"]}, quiet=False) as (srv, url):
        cut = connect(url)  # half its body, then a reset
        cut.sendall(head + image[:len(image) // 2])
        cut.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cut.close()
        gone = connect(url)  # a whole request, gone before the answer
        gone.sendall(head + image)
        gone.close()
        connect(url).close()
        time.sleep(0.3)
        assert http(url + "/score", image)[0] == 200
        time.sleep(0.2)
    assert "Traceback" not in capsys.readouterr().err


def png_bytes(width, height):
    """A flat grey PNG: a few kilobytes to send, width x height pixels to decode and draw."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 120, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def post_score(url, image, query=""):
    """A socket that has sent a whole POST /score of `image` (Connection: close)."""
    s = connect(url)
    s.sendall(b"POST /score%s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
              % (query.encode(), len(image)) + image)
    return s


def wait_for(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_contract_serve_drops_work_whose_client_has_gone(fitted, dataset, monkeypatch):
    """64 overlay uploads of a 25 Mpx PNG, sent and reset, kept both workers busy for 91 s
    and a real /score waited as long: a request whose client has gone leaves the queue at
    once, and a worker that has one drops it before decoding, after its wait for the model."""
    big, small = png_bytes(1000, 1000), vad.read_dataset(dataset).test[0].read_bytes()
    scored = []
    score_files = vad.score_files
    monkeypatch.setattr(vad, "score_files", lambda *a, **k: scored.append(1) or score_files(*a, **k))
    with serving({"m": fitted["padim"]}) as (srv, url):
        start = time.monotonic()
        assert srv.inspect("m", big, with_overlay=True)["verdict"]  # what one abandoned upload costs
        cost = time.monotonic() - start
        scored.clear()
        with srv.lock:  # the model is busy: 2 uploads wait for it on a worker, 6 in the queue
            abandoned = [post_score(url, big, "?overlay=1") for _ in range(8)]
            wait_for(lambda: srv.pending == 8)
            for s in abandoned:  # reset, as a client that gives up
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            # the 6 waiting leave the queue at once, their places and pixels free; the 2
            # that a worker holds leave when it has the model (before decoding)
            wait_for(lambda: srv.pending == 2 and srv.queued_pixels == 2 * 1000 * 1000)
        start = time.monotonic()
        status, answer = http(url + "/score?overlay=1", small)
        took = time.monotonic() - start
        assert status == 200 and answer["verdict"] in ("ok", "anomalous")
        wait_for(lambda: srv.pending == 0)
    assert len(scored) == 1  # the real one only
    assert took < 2 * cost, (took, cost)  # the 8 abandoned would cost 8 * cost


def test_contract_serve_bounds_the_queue_by_pixels(fitted, dataset):
    """Beside the count of queued requests, their pixels (read from each upload's header
    before it queues) are bounded: a large image over the bound gets 503 while a small
    one still fits; an idle server takes any image vad reads, whatever the bound."""
    big, small = png_bytes(200, 200), vad.read_dataset(dataset).test[0].read_bytes()  # 40,000 and 4,096 px
    with serving({"m": fitted["padim"]}, max_queued_pixels=90_000) as (srv, url):
        with srv.lock:
            queued = [post_score(url, big) for _ in range(2)]
            wait_for(lambda: srv.pending == 2)
            with post_score(url, big) as s:  # 120,000 px: refused at once, keeping no worker
                s.settimeout(5)
                status, headers, answer = parse_answer(read_until_closed(s))
            assert status == 503 and "90,000 pixels" in answer["error"] and headers["retry-after"] == "1"
            queued.append(post_score(url, small))  # 84,096 px: queued
            wait_for(lambda: srv.pending == 3 and srv.queued_pixels == 84_096)
        for s in queued:
            with s:
                assert parse_answer(read_until_closed(s))[0] == 200
        wait_for(lambda: srv.queued_pixels == 0)
    with serving({"m": fitted["padim"]}, max_queued_pixels=1_000) as (srv, url):
        assert http(url + "/score", big)[0] == 200


def test_contract_serve_sends_security_headers_and_refuses_other_hosts(server, fitted, model_file, monkeypatch):
    status, headers, page = raw(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    policy = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["default-src"] == "'none'" and policy["script-src"] == f"'sha256-{digest}'"
    assert policy["img-src"] == "data:" and policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in headers["content-security-policy"]
    for request in [b"GET /health HTTP/1.1\r\n", b"GET /nowhere HTTP/1.1\r\n", b"PUT / HTTP/1.1\r\n",
                    b"POST /score?model=tiles-padim HTTP/1.1\r\nContent-Length: 3\r\n"]:
        status, headers, _ = raw(server, request + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\nabc")
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    for host in ["localhost:8000", "LOCALHOST.", "127.0.0.1", "[::1]:8000", "10.1.2.3:8000"]:
        assert http(server + "/health", headers={"Host": host})[0] == 200
    for host in ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "inspect.lan"]:
        status, answer = http(server + "/health", headers={"Host": host})
        assert status == 421 and "--allow-host" in answer["error"]
    with serving({"m": fitted["padim"]}, allow_hosts=["Inspect.LAN"]) as (_, url):
        assert http(url + "/health", headers={"Host": "inspect.lan:8000"})[0] == 200
    seen = {}

    class Recorder(vad.InspectionServer):
        def serve_forever(self):
            seen["hosts"] = self.hosts
    monkeypatch.setattr(vad, "InspectionServer", Recorder)
    r = cli("serve", model_file, "--port", "0", "--allow-host", "inspect.lan", "--allow-host", "Other.Lan")
    assert r.exit_code == 0 and {"inspect.lan", "other.lan"} <= seen["hosts"]

def parse_prometheus_text(text):
    """Prometheus' text exposition format 0.0.4, read from its specification
    (prometheus.io/docs/instrumenting/exposition_formats) and checked as it goes:
    -> {family: {"type", "help", "samples": [(name, {label: value}, float)]}}.
    Asserts each line's grammar, HELP and TYPE at most once per family and before its
    samples, every sample in a declared family of its name, and for histograms buckets
    with increasing le, cumulative counts, a +Inf bucket equal to _count, and a _sum."""
    name_start = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:")
    name_chars = name_start | set("0123456789")

    def take_name(line, i, chars=name_chars, first=name_start):
        j = i
        assert j < len(line) and line[j] in first, (line, i)
        while j < len(line) and line[j] in chars:
            j += 1
        return line[i:j], j

    def number(token):
        assert token in ("+Inf", "-Inf", "NaN") or re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", token), token
        return float(token.replace("Inf", "inf"))

    families, seen_samples = {}, set()
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name, _ = take_name(parts[2], 0)
                assert name == parts[2] and name not in seen_samples, line  # before the family's samples
                family = families.setdefault(name, {"samples": []})
                key = parts[1].lower()
                assert key not in family, f"second {parts[1]} for {name}"
                value = parts[3] if len(parts) > 3 else ""
                if key == "type":
                    assert value in ("counter", "gauge", "histogram", "summary", "untyped"), line
                else:  # HELP text: \\ and \n are its only escapes
                    assert re.fullmatch(r"([^\\]|\\\\|\\n)*", value), line
                    value = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)
                family[key] = value
            continue
        name, i = take_name(line, 0)
        labels = {}
        if i < len(line) and line[i] == "{":
            i += 1
            while line[i] != "}":
                label, i = take_name(line, i, name_chars - {":"}, name_start - {":"})
                assert line[i:i + 2] == '="', line
                i, value = i + 2, []
                while line[i] != '"':
                    if line[i] == "\\":
                        assert line[i + 1] in '\\"n', line  # the only escapes in a label value
                        value.append("\n" if line[i + 1] == "n" else line[i + 1])
                        i += 2
                    else:
                        assert line[i] != "\n"
                        value.append(line[i])
                        i += 1
                assert label not in labels, line
                labels[label] = "".join(value)
                i += 1
                if line[i] == ",":
                    i += 1
            i += 1
        assert line[i] == " ", line
        fields = line[i + 1:].split(" ")
        assert len(fields) in (1, 2), line  # value, optional timestamp
        value = number(fields[0])
        owner = next((f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in families), None)
        assert owner is not None and "type" in families[owner], f"sample {name} before its TYPE"
        kind = families[owner]["type"]
        assert owner == name or kind in ("histogram", "summary"), line
        if kind == "counter":
            assert name.endswith("_total") and value >= 0, line
        seen_samples.add(owner)
        families[owner]["samples"].append((name, labels, value))
    for family, f in families.items():
        if f.get("type") != "histogram":
            continue
        series = {}
        for name, labels, value in f["samples"]:
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            series.setdefault(key, {"buckets": []})
            if name == family + "_bucket":
                series[key]["buckets"].append((number(labels["le"]), value))
            else:
                assert name in (family + "_sum", family + "_count") and "le" not in labels, name
                series[key][name[len(family) + 1:]] = value
        for key, s in series.items():
            bounds, counts = zip(*s["buckets"])
            assert list(bounds) == sorted(set(bounds)) and bounds[-1] == math.inf, (family, key)
            assert all(a <= b for a, b in zip(counts, counts[1:])), (family, key)  # cumulative
            assert counts[-1] == s["count"] and "sum" in s, (family, key)
    return families


def samples(families, name, **labels):
    """The values of a family's samples named `name` whose labels include `labels`."""
    family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
    return [v for n, ls, v in families[family]["samples"] if n == name and labels.items() <= ls.items()]


def test_prometheus_parser_refuses_what_the_format_forbids():
    good = ('# HELP a_total A count.\n# TYPE a_total counter\na_total{x="q\\"\\\\\\n"} 3\n'
            '# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 2\nh_sum 0.5\nh_count 2\n')
    families = parse_prometheus_text(good)
    assert families["a_total"]["samples"] == [("a_total", {"x": 'q"\\\n'}, 3.0)]
    for bad in ['a_total 3\n# TYPE a_total counter\n',  # a sample before its TYPE
                '# TYPE a counter\na 3\n',  # a counter without _total
                '# TYPE a_total counter\n# TYPE a_total counter\na_total 1\n',
                '# TYPE a_total counter\na_total{x="\\t"} 1\n',  # an escape the format lacks
                '# TYPE a_total counter\na_total{x=1} 1\n', '# TYPE a_total counter\na_total one\n',
                # buckets not cumulative; +Inf unequal to _count; no +Inf bucket
                '# TYPE h histogram\nh_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 1\n',
                '# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 2\nh_sum 0\nh_count 3\n',
                '# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_sum 0\nh_count 1\n']:
        with pytest.raises((AssertionError, IndexError)):
            parse_prometheus_text(bad)


def test_serve_metrics_parse_as_prometheus_text_and_count_what_was_done(fitted, dataset, drift_case):
    model_file, same, bright = drift_case
    odd = 'line "3"\\cam\n2'  # a model name that needs every escape of a label value
    models = {"tiles-padim": fitted["padim"], odd: vad.load(model_file)}
    test = vad.read_dataset(dataset).test
    with serving(models) as (_, url):
        answers = [http(url + "/score?model=tiles-padim", p.read_bytes())[1] for p in test[:3]]
        assert http(url + "/score?model=tiles-padim", b"not an image")[0] == 400
        status, answer = http(url + "/score", test[0].read_bytes())  # two models: which one?
        assert status == 404 and "2 models are served" in answer["error"] and "tiles-padim" in answer["error"]
        assert http(url + "/nowhere")[0] == 404
        quoted = urllib.parse.quote(odd)
        for p in same:
            answers.append(http(f"{url}/score?model={quoted}", p.read_bytes())[1])
        assert http(url + "/health")[1]["drift"] is False
        for p in bright:
            answers.append(http(f"{url}/score?model={quoted}", p.read_bytes())[1])
        assert http(url + "/health")[1] == {"status": "ok", "models": 2, "drift": True}
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            kind, text = r.headers["Content-Type"], r.read().decode()
        assert http(url + "/metrics", b"x")[0] == 405
        assert http(url + "/metrics", headers={"Host": "evil.example"})[0] == 421
    assert kind.startswith("text/plain; version=0.0.4")
    families = parse_prometheus_text(text)
    assert samples(families, "vad_requests_total", route="/score", status="200") == [3 + 24]
    assert samples(families, "vad_requests_total", route="/score", status="400") == [1]
    assert samples(families, "vad_requests_total", route="/score", status="404") == [1]
    assert samples(families, "vad_requests_total", route="other", status="404") == [1]
    assert samples(families, "vad_requests_total", route="/health", status="200") == [2]
    assert samples(families, "vad_request_duration_seconds_count", route="/score") == [3 + 1 + 1 + 24]
    for name, mine in (("tiles-padim", answers[:3]), (odd, answers[3:])):
        ok = sum(a["verdict"] == "ok" for a in mine)
        assert samples(families, "vad_verdicts_total", model=name, verdict="ok") == [ok]
        assert samples(families, "vad_verdicts_total", model=name, verdict="anomalous") == [len(mine) - ok]
        assert samples(families, "vad_score_count", model=name) == [len(mine)]
        assert samples(families, "vad_score_sum", model=name)[0] == pytest.approx(sum(a["score"] for a in mine))
        assert samples(families, "vad_score_bucket", model=name, le=repr(mine[0]["threshold"])) == [ok]
        assert samples(families, "vad_inference_seconds_count", model=name) == [len(mine) + (name != odd)]
    assert samples(families, "vad_verdicts_total", model="tiles-padim", verdict="error") == [1]
    q = np.sort(models[odd].held_out_scores.numpy())[-1]  # 20 held out: the 20th of 20
    assert samples(families, "vad_drift_window_above", model=odd) == [sum(a["score"] > q for a in answers[3:])]
    assert samples(families, "vad_drift_window_verdicts", model=odd) == [24]
    assert samples(families, "vad_drift", model=odd) == [1]
    assert samples(families, "vad_drift", model="tiles-padim") == [0]

# -----------------------------------------------------------------------------
# GPU (skipped without CUDA)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(vad.DETECTORS))
def test_cpu_and_gpu_agree(name, fitted, dataset, tmp_path):
    vad.save(fitted[name], tmp_path / "m.pt")
    gpu = vad.load(tmp_path / "m.pt", device="cuda")
    images = torch.stack([vad.read_image(p, SIZE) for p in vad.read_dataset(dataset).test])
    s_cpu, m_cpu = fitted[name].score(images)
    s_gpu, m_gpu = gpu.score(images.cuda())
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m_gpu.cpu(), m_cpu, rtol=1e-3, atol=1e-3)
