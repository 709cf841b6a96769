"""``vlp export``: a sharded DeepSpeed checkpoint → ``model.safetensors`` + ``config.yaml``.

The export is what evaluators load, without DeepSpeed or a process group:
:func:`load_model` rebuilds the model from the resolved recipe and loads the weights.
ZeRO stage 1–3 checkpoints are consolidated with DeepSpeed's own ``zero_to_fp32``
(fp32 master weights); stage 0 checkpoints hold the full module state already.
``fmt`` ``open_clip`` and ``hf`` write folders those libraries load without vlp
(``vlp.training.formats``); every export writes a model card ``README.md``.
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


def checkpoint_folder(run_dir: str | Path, step: int | None = None) -> Path:
    """The completed ``step-N/`` folder of ``run_dir`` to export (default: the latest)."""
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
    return folder


def export(
    run_dir: str | Path,
    out: str | Path | None = None,
    step: int | None = None,
    fmt: str = "vlp",
    evals: list | None = None,
) -> Path:
    """Write ``out/model.safetensors``, ``out/config.yaml`` and the model card
    ``out/README.md`` (``fmt`` ``vlp``), or another format's folder
    (``vlp.training.formats``: ``open_clip``, ``hf``); returns ``out``. ``evals``: the
    ``results.md`` files (or folders) for the card; default ``RUN_DIR/eval*/results.md``."""
    from safetensors.torch import save_file

    from vlp.training import formats

    run_dir = Path(run_dir)
    if fmt not in formats.FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {formats.FORMATS}")
    folder = checkpoint_folder(run_dir, step)
    if fmt != "vlp":
        return formats.export_format(run_dir, folder, fmt, out=out, evals=evals)
    formats.eval_tables(run_dir, evals)  # a bad --eval fails before anything is written
    out = Path(out) if out is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in _consolidated_state_dict(folder).items()}
    save_file(state, str(out / WEIGHTS), metadata={"source": str(folder), "format": "pt"})
    shutil.copyfile(run_dir / CONFIG, out / CONFIG)
    formats.write_model_card(run_dir, folder, fmt, out, evals)
    print(f"exported {folder} -> {out / WEIGHTS} ({len(state)} tensors)")
    return out


def weights_file(path: str | Path) -> Path:
    """``model.safetensors`` of an export folder or of a run directory's ``export/``."""
    path = Path(path)
    for candidate in (path / WEIGHTS, path / "export" / WEIGHTS):
        if candidate.is_file():
            return candidate
    if path.is_file() and path.name.endswith(".safetensors"):
        return path
    raise FileNotFoundError(
        f"{path}: no {WEIGHTS} here or in {path / 'export'} (run `vlp export RUN_DIR` first)"
    )


def warm_start(module, path: str | Path, include: list[str] | tuple[str, ...] = ()) -> int:
    """Copy the tensors of an export into ``module`` (a training module), before training.

    ``include`` lists name prefixes (``model.encoders.image``); empty selects every name
    the export and the module share. A selected name missing on either side, or with
    another shape, is an error that lists them: a warm start that silently loaded nothing
    would train from scratch. Returns the number of tensors loaded.
    """
    from safetensors.torch import load_file

    file = weights_file(path)
    saved = load_file(str(file))
    own = module.state_dict()

    def selected(name: str) -> bool:
        return not include or any(name == p or name.startswith(p + ".") for p in include)

    if include:
        wanted = {n for n in own if selected(n)} | {n for n in saved if selected(n)}
    else:
        wanted = set(own) & set(saved)
    missing = sorted(n for n in wanted if n not in saved)
    extra = sorted(n for n in wanted if n not in own)
    shapes = sorted(
        f"{n} {tuple(saved[n].shape)} vs {tuple(own[n].shape)}"
        for n in wanted
        if n in saved and n in own and saved[n].shape != own[n].shape
    )
    if missing or extra or shapes or not wanted:
        raise ValueError(
            f"train.init_from {file}: cannot initialise the model from it "
            f"(selected by init_include {list(include) or 'all'}): "
            + "; ".join(
                part
                for part in (
                    f"not in the export: {missing[:5]}" if missing else "",
                    f"not in the model: {extra[:5]}" if extra else "",
                    f"other shapes: {shapes[:3]}" if shapes else "",
                    "no tensor in common" if not wanted else "",
                )
                if part
            )
        )
    import torch

    with torch.no_grad():
        for name in sorted(wanted):
            own[name].copy_(saved[name].to(own[name].dtype))
    return len(wanted)


def load_model(path: str | Path, device: str = "cpu"):
    """Rebuild the training module (model and objectives, whose scorers the evaluators use)
    of an export folder, or of a run directory (exporting it first); returns it in eval
    mode with the recipe."""
    from safetensors.torch import load_file

    from vlp.config import load_recipe
    from vlp.training.module import build_pretraining_module

    path = Path(path)
    try:
        path = weights_file(path).parent
    except FileNotFoundError:
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(
                f"{path}: neither an export ({WEIGHTS}) nor a run directory"
            ) from None
        path = export(path)
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
