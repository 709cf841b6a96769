"""What a run shows and records: TensorBoard scalars, a plain text log, and progress.

Only rank 0 writes. On a terminal it draws a tqdm bar with loss, rate and ETA; otherwise
(Slurm, CI, a pipe) it prints a log line every ``log_every`` steps. Every line also goes to
``RUN_DIR/log.txt``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

LOG = logging.getLogger("vlp")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to stderr and RUN_DIR/log.txt; other ranks only warnings."""
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    LOG.addHandler(stream)
    if run_dir is not None and rank == 0:
        handler = logging.FileHandler(run_dir / "log.txt")
        handler.setFormatter(fmt)
        LOG.addHandler(handler)


class Monitor:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, log_every: int):
        self.rank = rank
        self.log_every = log_every
        self.total_steps = total_steps
        self.writer = None
        self.bar = None
        self._t0 = time.perf_counter()
        self._start_step = start_step
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        """Record the scalars of completed optimizer step ``step`` (1-based)."""
        if self.rank != 0:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        loss = scalars.get("loss/total", float("nan"))
        rate = scalars.get("perf/samples_per_s", float("nan"))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.1f}")
        elif step % self.log_every == 0 or step == self.total_steps:
            done = step - self._start_step
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(done, 1) * (self.total_steps - step)
            skipped = scalars.get("data/samples_skipped", 0.0)
            LOG.info(
                "step %d/%d loss %.4f | %.1f samples/s | data wait %.0f%% | eta %.0fs%s",
                step,
                self.total_steps,
                loss,
                rate,
                100 * scalars.get("perf/data_wait_fraction", 0.0),
                eta,
                f" | skipped {skipped:.0f} samples" if skipped else "",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
