"""JPEG decoding in the loader workers (CPU, PIL draft mode) vs on the GPU (nvJPEG, batched).

What is measured, on the same batch of ``--batch`` phantom studies (frontal views, 512-px
JPEGs, built once into ``$VLP_CACHE`` by :func:`vlp.data.phantom_cache.phantom_shards`):

* ``cpu path``: what a loader worker does per batch with ``data.decode_device: cpu``: the
  :class:`~vlp.data.decode.StudyDecoder` (decode, crop, resize, augment) and
  :func:`~vlp.data.collate.collate_studies`, in this process on one core.
* ``device path``: the worker's share with ``data.decode_device: cuda`` (header read,
  crop and affine draw, packing the files), timed the same way, plus
  :func:`~vlp.data.device_decode.decode_on_device` on the GPU (synchronised).

Each figure is the best of ``--rounds``. The ratio is images per worker core-second of the
two paths: how many more images the same CPU budget of a GPU node feeds, as long as the
GPU decode keeps up (its rate is printed beside it). Without a GPU the script says so and
runs the device path on the CPU (torchvision decodes there too), so the script is
exercised; that ratio is not the GPU's. Run: ``python benchmarks/gpu_decode.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time


def _raw_samples(count: int, patients: int) -> list[dict]:
    """The first ``count`` raw samples (members as bytes) of the phantom train shards."""
    from vlp.data.phantom import PhantomConfig
    from vlp.data.phantom_cache import phantom_shards
    from vlp.data.shards import iter_tar_samples, resolve_shards

    folder = phantom_shards(PhantomConfig(patients=patients, image_size=512), priors=0)
    members = frozenset({"json", "txt", "frontal.jpg"})
    samples = []
    for shard in resolve_shards(str(folder / "shards" / "train"), "train"):
        for sample in iter_tar_samples(shard.url, members):
            if "frontal.jpg" in sample:
                samples.append(sample)
            if len(samples) == count:
                return samples
    raise SystemExit(f"only {len(samples)} phantom studies; raise --patients")


def _worker_batch(samples: list[dict], cfg) -> dict:
    """What one loader worker does for one batch: decode (or plan) each sample, collate."""
    from vlp.data.collate import collate_studies
    from vlp.data.decode import StudyDecoder

    decoder = StudyDecoder(cfg)
    studies = [decoder(raw, random.Random(f"bench/{i}")) for i, raw in enumerate(samples)]
    return collate_studies(studies, None, cfg)


def _best(fn, rounds: int) -> tuple[float, object]:
    """Best wall time of ``fn()`` over ``rounds`` calls, and its last result."""
    best, result = float("inf"), None
    for _ in range(rounds):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    """Time both paths on one batch and print images/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="studies per batch (64)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (224)")
    parser.add_argument("--augment", default="convirt", help="augmentation preset (convirt)")
    parser.add_argument("--rounds", type=int, default=5, help="repetitions, best kept (5)")
    parser.add_argument("--patients", type=int, default=40, help="phantom patients (40)")
    args = parser.parse_args()

    import torch

    from vlp.data.batch import batch_to
    from vlp.data.loader import LoaderConfig
    from vlp.data.transforms import AUGMENT_PRESETS

    torch.set_num_threads(1)  # a loader worker's budget: one core
    samples = _raw_samples(args.batch, args.patients)
    cpu_cfg = LoaderConfig(
        shards="phantom",
        batch_size=args.batch,
        image_size=args.image_size,
        augment=AUGMENT_PRESETS[args.augment],
        sentences=False,
        reports=False,
    )
    device_cfg = dataclasses.replace(cpu_cfg, decode_device="cuda")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        sync = torch.cuda.synchronize
    else:
        print("no CUDA device here: running the device path on the CPU (not the GPU's figure)")
        device, sync = torch.device("cpu"), lambda: None

    n = args.batch
    cpu_s, _ = _best(lambda: _worker_batch(samples, cpu_cfg), args.rounds)
    plan_s, encoded = _best(lambda: _worker_batch(samples, device_cfg), args.rounds)

    def decode():
        batch = batch_to(encoded, device)
        sync()
        return batch

    decode(), decode()  # warm-up: nvJPEG handles, kernels
    decode_s, _ = _best(decode, args.rounds)
    print(f"{n} frontal 512-px JPEGs -> {args.image_size} px, augment {args.augment}")
    print(f"cpu path     (worker core): {n / cpu_s:8.1f} images/s")
    print(f"device path  (worker core): {n / plan_s:8.1f} images/s (header, crop/affine draw)")
    print(f"device path  ({device.type} decode): {n / decode_s:8.1f} images/s")
    print(f"ratio per worker core, device path / cpu path: {cpu_s / plan_s:.2f}x")
    print(f"ratio end to end on one core + {device.type}: {cpu_s / (plan_s + decode_s):.2f}x")


if __name__ == "__main__":
    main()
