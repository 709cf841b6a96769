"""Phantom generator throughput: studies per second on one core.

CPU seconds (``time.process_time``) give the per-core figure independently of other load
on the machine; wall-clock figures are printed too. Runs ``vlp.data.phantom.generate`` single-process (workers=1) into a temporary directory
and prints studies/s and images/s, at the default 512 px and at the MIMIC-sized
``PhantomConfig.full_size`` (3000 x 2500). Everything is included: drawing, JPEG encoding,
report writing, tables.

    python benchmarks/phantom_speed.py [--patients 40] [--full-patients 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from vlp.data.phantom import PhantomConfig, generate


def measure(config: PhantomConfig) -> dict:
    # Warm-up on a different seed so imports and caches do not count.
    with tempfile.TemporaryDirectory() as tmp:
        generate(
            tmp, PhantomConfig(**{**config.__dict__, "patients": 2, "seed": 99}), progress=False
        )
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = generate(tmp, config, progress=False)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    return {
        "studies": summary["studies"],
        "images": summary["images"],
        "seconds": seconds,
        "cpu_seconds": cpu,
        "studies_per_cpu_s": summary["studies"] / cpu,
        "studies_per_s": summary["studies"] / seconds,
        "images_per_s": summary["images"] / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--full-patients", type=int, default=3)
    args = parser.parse_args()
    for name, cfg in (
        ("512 px", PhantomConfig(patients=args.patients, seed=0, workers=1)),
        ("full size 3000x2500", PhantomConfig.full_size(patients=args.full_patients, seed=0)),
    ):
        r = measure(cfg)
        print(
            f"{name:>20}: {r['studies']} studies, {r['images']} images in {r['seconds']:.2f} s"
            f" -> {r['studies_per_s']:.1f} studies/s wall, {r['images_per_s']:.1f} images/s;"
            f" {r['studies_per_cpu_s']:.1f} studies per CPU-second (per core, load-independent)"
        )


if __name__ == "__main__":
    main()
