"""Time and peak memory of the local-MI loss (forward + backward) against a plain loop.

Paper dimensions (Liao et al., MICCAI 2021): 512-d regions (4×4 grid = 16 regions),
768-d sentences, discriminator 1280 → 1024 → 512 → 1. Default batch: 64 studies × 6
sentences. The loop implementation concatenates every region–sentence pair explicitly, one
sentence at a time, and keeps the autograd graph of all of them; it is run on fewer studies
by default because its memory grows as studies² (about 17 MB per sentence at 64 studies).

Each measurement runs in a fresh process; peak memory is the growth of the process's peak
resident set size (Linux VmHWM, reset before the measured step) over its size just before.
It is measured twice: with glibc's default allocator settings, whose heap keeps freed
chunks (so RSS overstates what tensors need), and with ``MALLOC_MMAP_THRESHOLD_=65536``,
which gives large blocks back on free, so the peak reflects the tensors actually alive.

    python benchmarks/local_mi_memory.py [--studies 64] [--loop-studies 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue as queue_module
import time

from tqdm import tqdm

REGIONS, LOCAL_DIM, SENTENCE_DIM, HIDDEN = 16, 512, 768, [1024, 512]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS


def _features(studies, sentences_per_study, torch):
    g = torch.Generator().manual_seed(0)
    index = torch.arange(studies).repeat_interleave(sentences_per_study)
    return {
        "image_local": torch.randn(studies, REGIONS, LOCAL_DIM, generator=g).requires_grad_(),
        "sentence": torch.randn(len(index), SENTENCE_DIM, generator=g).requires_grad_(),
        "sentence_index": index,
        "study_id": torch.arange(studies),
    }


def _loop_loss(critic, features, torch):
    """Straightforward InfoNCE local MI: explicit concatenation, a loop over sentences."""
    weight, bias = critic.first_layer()
    local, sentence = features["image_local"], features["sentence"]
    index, study = features["sentence_index"], features["study_id"]
    images = local.shape[0]
    rows = []
    for s in range(sentence.shape[0]):
        pairs = torch.cat(
            [local.reshape(-1, LOCAL_DIM), sentence[s].expand(images * REGIONS, -1)], dim=1
        )
        image_scores = critic.rest(pairs @ weight.T + bias).view(images, REGIONS).amax(1)
        own = int(index[s])
        keep = (study != study[own]) | (torch.arange(images) == own)
        candidates = image_scores[keep]
        positive = image_scores[own]
        rows.append(positive - torch.logsumexp(candidates, 0) + math.log(len(candidates)))
    return -torch.stack(rows).mean()


def _measure(variant, studies, sentences, repeats, queue):
    import torch

    from vlp.objectives.base import FeatureDims, ObjectiveSpec, build_objective

    torch.manual_seed(0)
    dims = FeatureDims(embed_dim=768, local_dim=LOCAL_DIM, sentence_dim=SENTENCE_DIM)
    objective = build_objective(
        # The paper's critic and pooling (Eq. 5: concatenation MLP, max over regions), named:
        # the loop below implements exactly those, and the defaults became the separable
        # critic with a logsumexp over regions (what learns on the phantom).
        ObjectiveSpec(
            "local_mi",
            params={
                "critic": {"kind": "concat", "hidden_dims": HIDDEN},
                "region_pool": "max",
                "estimator": "cpc",
            },
        ),
        dims,
    )
    times, peaks, value = [], [], None
    for _ in range(repeats):
        features = _features(studies, sentences, torch)
        objective.zero_grad(set_to_none=True)
        _reset_peak()
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        if variant == "vectorised":
            loss = objective(features, {}).losses["mi"]
        else:
            loss = _loop_loss(objective.critic, features, torch)
        loss.backward()
        times.append(time.perf_counter() - start)
        peaks.append((_rss_kib("VmHWM") - before) / 1024)
        value = float(loss.detach())
        del loss, features
    queue.put((variant, studies, studies * sentences, min(times), max(peaks), value))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--sentences", type=int, default=6, help="sentences per study")
    parser.add_argument("--loop-studies", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    runs = [
        ("vectorised", args.studies),
        ("vectorised", args.loop_studies),
        ("loop", args.loop_studies),
    ]
    context = mp.get_context("spawn")
    queue = context.Queue()

    def run(variant, studies, mmap_threshold):
        env_before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        if mmap_threshold:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at process start
        try:
            process = context.Process(
                target=_measure, args=(variant, studies, args.sentences, args.repeats, queue)
            )
            process.start()
            while True:  # a child that dies without a row must not leave us waiting
                try:
                    row = queue.get(timeout=2.0)
                    break
                except queue_module.Empty:
                    if not process.is_alive():
                        raise SystemExit(
                            f"local_mi_memory: the {variant} measurement at {studies} studies "
                            f"died (exit code {process.exitcode}); its traceback is above"
                        ) from None
            process.join()
        finally:
            if env_before is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = env_before
        return row

    print(
        f"local MI, InfoNCE, {REGIONS} regions × {LOCAL_DIM}-d, sentences {SENTENCE_DIM}-d, "
        f"critic {LOCAL_DIM + SENTENCE_DIM}→{'→'.join(map(str, HIDDEN))}→1, all negatives"
    )
    header = f"{'variant':<11} {'studies':>7} {'sentences':>9} {'fwd+bwd s':>10}"
    print(f"{header} {'peak MB':>8} {'peak MB (mmap)':>15}  loss")
    results = {}
    for variant, studies in tqdm(runs, desc="runs", leave=False):
        row = run(variant, studies, mmap_threshold=False)
        mmap_row = run(variant, studies, mmap_threshold=True)
        results[(variant, studies)] = (row, mmap_row)
        _, n, s, seconds, peak, value = row
        tqdm.write(
            f"{variant:<11} {n:>7} {s:>9} {min(seconds, mmap_row[3]):>10.3f} {peak:>8.0f} "
            f"{mmap_row[4]:>15.0f}  {value:.6f}"
        )
    fast, slow = results[("vectorised", args.loop_studies)], results[("loop", args.loop_studies)]
    print(
        f"at {args.loop_studies} studies the vectorised loss is "
        f"{slow[0][3] / fast[0][3]:.1f}× faster, its peak (mmap) is "
        f"{slow[1][4] / max(fast[1][4], 1):.1f}× smaller; the losses differ by "
        f"{abs(slow[0][5] - fast[0][5]):.2e}"
    )


if __name__ == "__main__":
    main()
