"""``vlp export``: a sharded DeepSpeed checkpoint → ``model.safetensors`` + ``config.yaml``.

The export is what evaluators load, without DeepSpeed or a process group:
:func:`load_model` rebuilds the model from the resolved recipe and loads the weights.
ZeRO stage 1–3 checkpoints are consolidated with DeepSpeed's own ``zero_to_fp32``
(fp32 master weights); stage 0 checkpoints hold the full module state already.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vlp.training.checkpoint import completed_checkpoints, latest_checkpoint, step_tag

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def _consolidated_state_dict(folder: Path) -> dict:
    import torch

    if list(folder.glob("*optim_states.pt")) and list(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no DeepSpeed model states (mp_rank_*_model_states.pt)")
    # weights_only: a checkpoint from someone else cannot run code when it is read.
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


def export(run_dir: str | Path, out: str | Path | None = None, step: int | None = None) -> Path:
    """Write ``out/model.safetensors`` and ``out/config.yaml``; returns ``out``."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG})")
    if step is None:
        folder = latest_checkpoint(run_dir)
        if folder is None:
            raise FileNotFoundError(f"{run_dir} has no completed checkpoint (step-N/COMPLETE)")
    else:
        folder = run_dir / step_tag(step)
        if folder not in [f for _, f in completed_checkpoints(run_dir)]:
            raise FileNotFoundError(f"{folder} is not a completed checkpoint")
    out = Path(out) if out is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in _consolidated_state_dict(folder).items()}
    save_file(state, str(out / WEIGHTS), metadata={"source": str(folder), "format": "pt"})
    shutil.copyfile(run_dir / CONFIG, out / CONFIG)
    print(f"exported {folder} -> {out / WEIGHTS} ({len(state)} tensors)")
    return out


def load_model(path: str | Path, device: str = "cpu"):
    """Rebuild the training module (model and objectives, whose scorers the evaluators use)
    of an export folder, or of a run directory (exporting it first); returns it in eval
    mode with the recipe."""
    from safetensors.torch import load_file

    from vlp.config import load_recipe
    from vlp.training.module import build_pretraining_module

    path = Path(path)
    if not (path / WEIGHTS).is_file():
        if (path / "export" / WEIGHTS).is_file():
            path = path / "export"
        elif (path / CONFIG).is_file():
            path = export(path)
        else:
            raise FileNotFoundError(f"{path}: neither an export ({WEIGHTS}) nor a run directory")
    import torch

    torch.set_flush_denormal(True)  # see vlp.training.trainer: denormals slow CPU kernels badly
    cfg = load_recipe(path / CONFIG)
    model = build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size)
    missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS} does not match the recipe's model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), cfg
