"""Per-example data augmentation in the benchmark: ``python -m stn_kernels.bench --layer augment``.

Images per second of one augmentation of a CIFAR-10-shaped batch (B = 128, 3×32×32, float32 in [0, 1]; or
``--shape B,C,H,W``) with colour jitter (brightness, contrast, saturation 0.4, hue 0.1), cutout (1 hole of
length 16) and input scale (0.2), one row per provider (cases per layer as data: :data:`SHAPES`,
:data:`PROVIDERS`):

* ``stn``: ``stn_kernels.augment_images`` on the batch (the reference on the CPU; with ``--gpu`` the
  Triton kernel on CUDA tensors);
* ``published-pil``: a stand-in of the published per-example path: each image as a uint8 PIL image (how
  the CIFAR dataset hands it over), its own ``torchvision.transforms.ColorJitter`` built from its strengths,
  ``ToTensor``, then Cutout with one mask per example and the input scale, on the CPU;
* ``torchvision-v2``: ``torchvision.transforms.v2.ColorJitter`` per example on the tensor image, then
  ``v2.functional.erase`` per hole and the scale (on the batch's device).

Forward only (the published path is data loading, with no gradient). Without torchvision (or PIL) the two
torchvision providers are skipped with a note. Medians of interleaved rounds.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from stn_kernels import augment_images, use_backend


class AugmentShape(NamedTuple):
    name: str
    B: int
    C: int
    H: int
    W: int


SHAPES = {"cifar10": AugmentShape("cifar10", 128, 3, 32, 32)}
SHAPE_FORMAT = "B,C,H,W"
STRENGTHS = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, holes=1, length=16, scale=0.2)


def parse_shape(spec) -> AugmentShape:
    if isinstance(spec, AugmentShape):
        return spec
    if spec in SHAPES:
        return SHAPES[spec]
    try:
        B, C, H, W = (int(p) for p in spec.split(","))
    except (AttributeError, ValueError):
        raise ValueError(f"shape: expected one of {sorted(SHAPES)} or '{SHAPE_FORMAT}', got {spec!r}") from None
    return AugmentShape(f"custom-{B}x{C}x{H}x{W}", B, C, H, W)


def _cutout_and_scale(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The published Cutout (one mask per example, multiplied over the channels), then the input scale."""
    h, w = image.shape[-2:]
    mask = torch.ones(h, w)
    half = STRENGTHS["length"] // 2
    for _ in range(STRENGTHS["holes"]):
        y, x = (int(v) for v in torch.randint(0, h, (1,), generator=gen).tolist() +
                torch.randint(0, w, (1,), generator=gen).tolist())
        mask[max(0, y - half):min(h, y + half), max(0, x - half):min(w, x + half)] = 0.0
    s = STRENGTHS["scale"]
    factor = 1 / (1 + s) + torch.rand((), generator=gen).item() * (1 + s - 1 / (1 + s))
    return image * mask.to(image.device) * factor


def _published_pil(images: torch.Tensor) -> Callable[[], torch.Tensor]:
    from PIL import Image
    from torchvision import transforms

    arrays = [(img.permute(1, 2, 0).cpu() * 255).to(torch.uint8).numpy() for img in images]
    to_tensor, gen = transforms.ToTensor(), torch.Generator().manual_seed(0)
    jitter = {k: STRENGTHS[k] for k in ("brightness", "contrast", "saturation", "hue")}

    def run():
        out = []
        for array in arrays:  # per example: its own ColorJitter, as the published Dataset builds it
            image = transforms.ColorJitter(**jitter)(Image.fromarray(array))
            out.append(_cutout_and_scale(to_tensor(image), gen))
        return torch.stack(out)

    return run


def _torchvision_v2(images: torch.Tensor) -> Callable[[], torch.Tensor]:
    from torchvision.transforms import v2

    gen = torch.Generator().manual_seed(0)
    jitter = {k: STRENGTHS[k] for k in ("brightness", "contrast", "saturation", "hue")}

    def run():
        return torch.stack([_cutout_and_scale(v2.ColorJitter(**jitter)(img), gen) for img in images])

    return run


def _stn(images: torch.Tensor) -> Callable[[], torch.Tensor]:
    batch = images.shape[0]
    strengths = {k: torch.full((batch,), float(v), device=images.device) for k, v in STRENGTHS.items()}
    backend = "triton" if images.is_cuda else "reference"

    def run():
        with use_backend(backend):
            return augment_images(images, max_holes=STRENGTHS["holes"], **strengths)

    return run


PROVIDERS: Dict[str, Callable[[torch.Tensor], Callable[[], torch.Tensor]]] = {
    "stn": _stn, "published-pil": _published_pil, "torchvision-v2": _torchvision_v2,
}
DESCRIPTIONS = {
    "stn": "stn_kernels.augment_images on the batch (reference on CPU, Triton on CUDA)",
    "published-pil": "per example: PIL image, its own ColorJitter, ToTensor, Cutout, scale (CPU)",
    "torchvision-v2": "per example: v2.ColorJitter on the tensor, Cutout, scale",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_providers(shape: AugmentShape, device: torch.device, quick: bool,
                   providers: Optional[List[str]] = None) -> List[dict]:
    """One row per provider: median seconds per batch over interleaved rounds, images per second."""
    images = torch.rand(shape.B, shape.C, shape.H, shape.W, generator=torch.Generator().manual_seed(0)).to(device)
    rounds, calls = (2, 1) if quick else (7, 3)
    runs, rows = {}, []
    for name in providers or list(PROVIDERS):
        try:
            runs[name] = PROVIDERS[name](images)
            runs[name]()  # warm-up (and the import of torchvision)
        except ImportError as exc:
            rows.append({"provider": name, "note": f"skipped: {exc}"})
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / calls)
    for name, times in samples.items():
        seconds = statistics.median(times)
        rows.append({"provider": name, "ms": 1e3 * seconds, "images_per_s": shape.B / seconds, "note": ""})
    return rows


def table(shape: AugmentShape, rows: List[dict]) -> List[str]:
    base = next((r for r in rows if r["provider"] == "published-pil" and "ms" in r), None)
    lines = [f"augmentation of {shape.name} (B={shape.B}, {shape.C}×{shape.H}×{shape.W}): jitter (brightness, "
             "contrast, saturation 0.4, hue 0.1), cutout (1 hole, length 16), input scale 0.2; forward only", "",
             "| provider | ms / batch | images / s | vs published-pil | what |", "|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['provider']} | – | – | – | {r['note']} |")
            continue
        ratio = f"{base['ms'] / r['ms']:.1f}×" if base else "–"
        lines.append(f"| {r['provider']} | {r['ms']:.2f} | {r['images_per_s']:,.0f} | {ratio} | "
                     f"{DESCRIPTIONS[r['provider']]} |")
    return lines


def run(device: torch.device, shapes: List[AugmentShape], quick: bool,
        providers: Optional[List[str]] = None) -> List[str]:
    lines: List[str] = []
    for shape in shapes:
        lines += table(shape, time_providers(shape, device, quick, providers)) + [""]
    return lines
