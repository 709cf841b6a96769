"""Export formats other libraries load without vlp, and the model card of every export.

``vlp export RUN --format FORMAT`` (``vlp.training.export.export``) writes one of:

``vlp`` (default, ``RUN/export``)
    ``model.safetensors`` + ``config.yaml``: what ``vlp.training.export.load_model`` and the
    evaluators read.
``open_clip`` (``RUN/export-open_clip``)
    the folder layout of open_clip's own ``push_to_hf_hub.save_for_hf``, written by it:
    ``open_clip_config.json`` (``model_cfg``: a timm image tower, an HF text tower;
    ``preprocess_cfg``), ``open_clip_model.safetensors`` (open_clip's state-dict names), the
    tokenizer files, and ``hf_text/`` (the text tower's ``save_pretrained`` folder that
    ``text_cfg.hf_model_name`` names by its absolute path). Loaded with open_clip's
    documented local-folder path (open_clip 3.x ``factory.create_model``, schema
    ``local-dir:``)::

        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:RUN/export-open_clip")
        model.eval()
        tokenizer = open_clip.get_tokenizer("local-dir:RUN/export-open_clip")
        image = preprocess(PIL.Image.open("cxr.png").convert("L")).unsqueeze(0)
        img = model.encode_image(image, normalize=True)
        txt = model.encode_text(tokenizer(["small left pleural effusion"]), normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T

``hf`` (``RUN/export-hf``)
    ``text/``: the text tower and tokenizer by ``save_pretrained`` (``AutoModel`` /
    ``AutoTokenizer.from_pretrained``); ``image/``: the timm tower by timm's
    ``save_for_hf`` (``timm.create_model("local-dir:RUN/export-hf/image", pretrained=True)``,
    1 input channel, normalisation in its ``pretrained_cfg``); ``projections.safetensors``
    + ``projections.json``: the heads as lists of layers (linear, layernorm, batchnorm,
    gelu, relu), which input each reads (the timm model's pooled output; the text tower's
    last hidden state pooled cls/mean/last) and the logit scale. See :data:`HF_LOADING`.

Equivalence with vlp (checked by every export on a probe, and by
``tests/test_export_formats.py``): vlp feeds 1-channel uint8 images and normalises inside
the tower, ``(x/255 - mean) / std``; open_clip feeds 3-channel images normalised by its
preprocess. The open_clip export spreads the first convolution's 1-channel kernel over 3
channels (each a third: on a gray image replicated to RGB it sums back to the original)
and writes vlp's mean/std for each channel into ``preprocess_cfg``, so on a grayscale
image the two give the same embeddings. Resizing is bilinear on the shortest side and a
centre crop, as vlp's decoder does, but vlp crops before resizing: only images already at
``data.image_size`` are bit-for-bit the same input. open_clip's tokenizer cleans text
first (ftfy, HTML unescape, whitespace), vlp's does not.

What open_clip can express, and so what the open_clip format refuses with one line naming
why: one ``image`` encoder (current study) with a timm tower built as open_clip builds it
(no extra timm kwargs; ViTs only at timm's default size, open_clip does not pass
``img_size`` to timm), one ``text`` encoder with a Hugging Face encoder of a family in
open_clip's ``hf_configs.arch_dict`` pooled cls or mean, ``global_head``/``text_head``
``pool``, a projection open_clip has on both sides (identity, or linear without bias: its
HF text projection has no bias; no vlp mlp matches both of open_clip's mlps), and the
single objective ``clip`` (cosine, learned logit scale). Not a Liao ResNet, an open_clip
tower under a vlp head, BioViL's ``mean_local`` head, attention pooling, MI critics.
The hf format needs only the two towers (any timm model, any HF model and pooling) and
``pool`` heads of any projection kind; it refuses the other towers, encoders and heads
alike, and records no scorer for objectives other than ``clip``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("vlp", "open_clip", "hf")
CARD = "README.md"
#: the text tower's save_pretrained folder inside an open_clip export.
OPEN_CLIP_TEXT = "hf_text"
PROJECTIONS = "projections.safetensors"
PROJECTIONS_JSON = "projections.json"
#: largest |difference| of unit embeddings the export's own check accepts.
CHECK_TOLERANCE = 1e-4
PROBE_TEXTS = ("small left pleural effusion", "no acute cardiopulmonary process")
_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}


class NotExpressible(ValueError):
    """The model has a part the requested format cannot hold (one line: what and why)."""


# --------------------------------------------------------------------------- the model


@dataclass
class _Parts:
    """The pieces of a two-tower model that the formats write."""

    image_name: str
    tower: object  # vlp.models.image.TimmTower
    image_head: object  # ProjectionHead of <image>_global
    text: object  # vlp.models.text.TextTower
    text_head: object  # ProjectionHead of report
    sentence_head: object | None
    image_size: int


def _tower_name(encoder) -> str:
    config = getattr(encoder, "config", None)
    return str(getattr(getattr(config, "tower", None), "name", type(encoder).__name__))


def _two_towers(module, fmt: str) -> tuple[_Parts | None, list[str]]:
    """The parts, or None and the reasons they are not one image tower + one text tower
    with pooled projections."""
    from vlp.models.encoders import ImageEncoder, TextEncoder
    from vlp.models.heads import ProjectionHead
    from vlp.models.image import LiaoResNet, OpenClipTower, TimmTower
    from vlp.models.model import image_feature_keys

    model = module.model
    reasons = []
    images = model.image_encoders
    if len(images) != 1:
        reasons.append(f"{len(images)} image encoders {images}: {fmt} holds one image tower")
    for name in images:
        encoder = model.encoders[name]
        if type(encoder) is not ImageEncoder:
            reasons.append(
                f"image encoder {name!r} is a {type(encoder).__name__} (MoVE, BioViL-T, MAE or a "
                f"plugin): {fmt} holds a plain `image` encoder, one tower on one view"
            )
            continue
        if encoder.config.time != 0:
            reasons.append(f"image encoder {name!r} reads prior {encoder.config.time}")
        tower = encoder.tower
        if isinstance(tower, LiaoResNet):
            reasons.append(
                f"image tower {_tower_name(encoder)!r} is Liao et al.'s ResNet, not a timm "
                f"model: {fmt} takes timm image towers"
            )
        elif isinstance(tower, OpenClipTower):
            reasons.append(
                f"image tower {_tower_name(encoder)!r} is an open_clip visual tower under a vlp "
                f"projection: {fmt} takes timm image towers (export that tower's own checkpoint)"
            )
        elif not isinstance(tower, TimmTower):
            reasons.append(
                f"image tower {_tower_name(encoder)!r} ({type(tower).__name__}) is not a timm model"
            )
    text_name = model.text_encoder
    if text_name is None:
        reasons.append(f"the model has no text encoder: {fmt} holds an image and a text tower")
    elif type(model.encoders[text_name]) is not TextEncoder:
        reasons.append(f"text encoder {text_name!r} is not a plain `text` encoder")
    if model.cfg.global_head != "pool":
        reasons.append(
            f"global_head {model.cfg.global_head!r} forms the image embedding from local tokens "
            f"(mean_local: BioViL's mean of projected regions; attention_pool: learned "
            f"queries): {fmt} projects the tower's pooled feature"
        )
    if model.cfg.text_head != "pool":
        reasons.append(
            f"text_head {model.cfg.text_head!r} pools token states with learned attention: "
            f"{fmt} projects the text tower's pooled vector"
        )
    if reasons:
        return None, reasons
    name = images[0]
    head = model.heads[image_feature_keys(name)[0]]
    report = model.heads["report"]
    if not isinstance(getattr(head, "head", None), ProjectionHead) or not isinstance(
        report, ProjectionHead
    ):
        return None, ["the global heads are not projection heads"]
    sentence = dict(model.heads.items()).get("sentence")  # (nn.ModuleDict has no .get)
    parts = _Parts(
        image_name=name,
        tower=model.encoders[name].tower,
        image_head=head.head,
        text=model.encoders[text_name].tower,
        text_head=report,
        sentence_head=sentence,
        image_size=int(model.image_size),
    )
    return parts, []


def _trained_module(run_dir: Path, folder: Path):
    """The training module of checkpoint ``folder`` (eval mode) and the run's recipe."""
    import torch

    from vlp.config import load_recipe

    # The consolidation export uses (ZeRO 1-3 via zero_to_fp32), without writing its files.
    from vlp.training.export import CONFIG, _consolidated_state_dict
    from vlp.training.module import build_pretraining_module

    torch.set_flush_denormal(True)  # as load_model: denormals slow CPU kernels badly
    cfg = load_recipe(run_dir / CONFIG)
    module = build_pretraining_module(cfg.model, cfg.objectives, cfg.data.image_size)
    missing, unexpected = module.load_state_dict(_consolidated_state_dict(folder), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not match the recipe's model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return module.eval(), cfg


def _clip_objective(module, reasons: list[str]):
    """The recipe's ``clip`` objective if it is the only one; else a reason."""
    from vlp.objectives.contrastive import ClipObjective

    objectives = dict(module.objectives.items())
    others = [name for name, o in objectives.items() if not isinstance(o, ClipObjective)]
    for name in others:
        # The objective's module tells what it adds: a critic (vlp.objectives.mi) or other
        # trained parts and losses that open_clip's CLIP has no slot for.
        kind = type(objectives[name]).__module__.rsplit(".", 1)[-1]
        what = "an MI critic" if kind == "mi" else "this objective's own loss and parameters"
        reasons.append(
            f"objective {name!r} is not clip: open_clip holds one cosine score with a learned "
            f"logit scale, not {what}"
        )
    clips = [o for o in objectives.values() if isinstance(o, ClipObjective)]
    if not clips and not others:
        reasons.append("no clip objective: open_clip needs its learned logit scale")
    if len(clips) == 1 and not clips[0].config.normalize:
        reasons.append("clip.normalize is false: open_clip scores the cosine")
    return clips[0] if len(clips) == 1 and not others else None


# --------------------------------------------------------------------------- open_clip


def _image_projection(head_cfg, problems: list[str]) -> dict:
    """vision_cfg keys of open_clip's ``TimmModel`` head that equal vlp's image head."""
    if head_cfg.kind == "identity":
        return {"timm_proj": "none"}
    if head_cfg.kind == "linear":
        # TimmModel: Dropout, then Linear(bias=timm_proj_bias) on the pooled trunk output.
        return {"timm_proj": "linear", "timm_proj_bias": bool(head_cfg.bias)}
    problems.append(
        "projection mlp: open_clip's timm mlp (hidden 2*embed_dim, first layer with bias) and "
        "its HF text mlp (hidden (width+embed_dim)/2, no biases) differ from each other, and "
        "one vlp `model.projection` shapes both heads: use linear with bias: false or identity"
    )
    return {}


def _text_projection(head_cfg, problems: list[str]) -> dict:
    """text_cfg keys of open_clip's ``HFTextEncoder`` projection that equal vlp's."""
    if head_cfg.kind == "identity":
        return {"hf_proj_type": None}  # HFTextEncoder: Identity when width == embed_dim
    if head_cfg.kind == "linear":
        if head_cfg.bias:
            problems.append(
                "projection linear with bias: open_clip's HF text projection "
                "(hf_proj_type linear) has no bias; train with model.projection.bias: false"
            )
        return {"hf_proj_type": "linear"}
    return {}  # mlp: reported by _image_projection


def _timm_pool(model) -> str | None:
    """The global pooling a timm model was built with (``avg``, ``token``, ...)."""
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    return pool if isinstance(pool, str) and pool else None


def open_clip_config(module, cfg, text_dir: str) -> tuple[dict, dict]:
    """(``model_cfg``, ``preprocess_cfg``) of open_clip for ``module``, whose text tower
    is (to be) saved at ``text_dir``; :class:`NotExpressible` names every part open_clip
    cannot hold."""
    from open_clip.hf_configs import arch_dict

    parts, problems = _two_towers(module, "open_clip")
    _clip_objective(module, problems)
    if parts is None:
        raise NotExpressible("cannot export to open_clip: " + "; ".join(problems))
    tower_cfg = module.model.encoders[parts.image_name].config.tower
    params = tower_cfg.params
    if params.get("kwargs"):
        problems.append(
            f"timm kwargs {params['kwargs']}: open_clip's TimmModel passes only drop_path "
            "and patch_drop to timm.create_model"
        )
    pool = _timm_pool(parts.tower.model)
    if pool is None:
        problems.append(f"cannot tell the global pooling of timm model {tower_cfg.name!r}")
    head_cfg = module.model.cfg.projection
    vision = {
        "image_size": parts.image_size,
        "timm_model_name": parts.tower.model.pretrained_cfg.get("architecture")
        or tower_cfg.name.removeprefix("timm:"),
        "timm_model_pretrained": False,
        "timm_pool": pool,
        **_image_projection(head_cfg, problems),
        "timm_drop": 0.0,
    }
    if params.get("drop_path_rate"):
        vision["timm_drop_path"] = float(params["drop_path_rate"])
    text = parts.text
    hf_config = text.model.config
    if hf_config.model_type not in arch_dict:
        problems.append(
            f"text model type {hf_config.model_type!r} is not in open_clip's hf_configs "
            f"(it knows {sorted(arch_dict)})"
        )
    if text.pooling not in _POOLERS:
        problems.append(
            f"text pooling {text.pooling!r}: open_clip's HF poolers are cls and mean (and max)"
        )
    tokenizer = text.tokenizer
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != hf_config.pad_token_id:
        problems.append(
            f"tokenizer pad id {tokenizer.pad_token_id} differs from the model's pad_token_id "
            f"{hf_config.pad_token_id}: open_clip masks padding by the model's pad_token_id"
        )
    text_cfg = {
        "hf_model_name": text_dir,
        "hf_tokenizer_name": text_dir,
        "hf_pooler_type": _POOLERS.get(text.pooling, ""),
        **_text_projection(head_cfg, problems),
        "context_length": int(text.max_length),
    }
    if problems:
        raise NotExpressible("cannot export to open_clip: " + "; ".join(problems))
    embed_dim = int(parts.text_head.out_dim)
    model_cfg = {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text_cfg}
    mean, std = float(tower_cfg.mean), float(tower_cfg.std)
    preprocess = {
        "size": parts.image_size,
        "mode": "RGB",
        # The image repeated in 3 channels, each normalised as vlp normalises its one.
        "mean": (mean, mean, mean),
        "std": (std, std, std),
        # vlp.data.decode: a centred square crop resized bilinearly.
        "interpolation": "bilinear",
        "resize_mode": "shortest",
    }
    return model_cfg, preprocess


def _open_clip_state(module, parts: _Parts, target: dict) -> tuple[dict, list[str]]:
    """vlp's tensors under open_clip's names (``target``: the open_clip model's state)."""
    objective = _clip_objective(module, [])
    source = {}
    for key, value in parts.tower.model.state_dict().items():
        source[f"visual.trunk.{key}"] = value
    for key, value in parts.image_head.net.state_dict().items():
        source[f"visual.head.proj.{key}"] = value
    for key, value in parts.text.model.state_dict().items():
        source[f"text.transformer.{key}"] = value
    for key, value in parts.text_head.net.state_dict().items():
        source[f"text.proj.{key}"] = value
    scale = objective.logit_scale
    # vlp applies the cap in the forward pass (LogitScale); open_clip's training clamps the
    # stored value, so the capped value is the one that scores alike.
    source["logit_scale"] = scale.log_scale.detach().clamp(max=scale.max_log).reshape(())
    state, problems = {}, []
    for key, want in target.items():
        value = source.pop(key, None)
        if value is None:
            problems.append(f"open_clip's {key} has no vlp tensor")
            continue
        spread = value.ndim == 4 and value.shape[1] == 1 and want.shape[1] == 3
        if spread and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
            # The 1-channel kernel over 3 equal channels: sums back to it on gray input.
            value = value.repeat(1, 3, 1, 1) / 3.0
        if value.shape != want.shape:
            problems.append(
                f"{key} is {tuple(value.shape)} in vlp, {tuple(want.shape)} in open_clip (open_clip "
                "builds timm models at their default size and passes no img_size)"
            )
            continue
        state[key] = value.to(want.dtype).contiguous()
    # The text tower's unused BERT pooler (vlp pools cls/mean itself) is dropped.
    extra = [k for k in source if not k.startswith("text.transformer.pooler.")]
    problems += [f"vlp's {k} has no place in open_clip" for k in extra[:3]]
    return state, problems


def _probe(image_size: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 1, image_size, image_size), generator=generator).to(
        torch.uint8
    )


def _vlp_embeddings(module, images, texts):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        image = module.model.encode_image(images)["image_global"]
        text = module.model.encode_text(list(texts))
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def write_open_clip(module, cfg, out: Path) -> dict:
    """Write the open_clip folder ``out``; returns what the model card reports."""
    import open_clip
    import torch
    from open_clip.factory import set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_for_hf

    text_dir = (out / OPEN_CLIP_TEXT).resolve()
    model_cfg, preprocess = open_clip_config(module, cfg, str(text_dir))
    parts, _ = _two_towers(module, "open_clip")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    parts.text.model.save_pretrained(text_dir)
    parts.text.tokenizer.save_pretrained(text_dir)
    build_cfg = json.loads(json.dumps(model_cfg))
    build_cfg["text_cfg"]["hf_model_pretrained"] = False  # weights come from vlp below
    clip = open_clip.CustomTextCLIP(**build_cfg).eval()
    state, problems = _open_clip_state(module, parts, clip.state_dict())
    if problems:  # found only now that the weights meet open_clip's: leave nothing behind
        shutil.rmtree(out if created else text_dir, ignore_errors=True)
        raise NotExpressible("cannot export to open_clip: " + "; ".join(problems))
    clip.load_state_dict(state, strict=True)
    set_model_preprocess_cfg(clip, preprocess)
    # open_clip's own writer: open_clip_model.safetensors, tokenizer files and
    # open_clip_config.json ({model_cfg, preprocess_cfg}), as it pushes models to the Hub.
    save_for_hf(clip, parts.text.tokenizer, model_cfg, out, safe_serialization=True)
    # Equivalence, through open_clip's loader as a user calls it.
    loaded, _, transform = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    from PIL import Image

    images = _probe(parts.image_size)
    pil = [Image.fromarray(image[0].numpy()) for image in images]  # uint8 2-D: mode L
    with torch.no_grad():
        got_image = loaded.eval().encode_image(torch.stack([transform(p) for p in pil]), True)
        got_text = loaded.encode_text(tokenizer(list(PROBE_TEXTS)), True)
    want_image, want_text = _vlp_embeddings(module, images, PROBE_TEXTS)
    error = max(
        float((got_image - want_image).abs().max()), float((got_text - want_text).abs().max())
    )
    if error > CHECK_TOLERANCE:
        raise RuntimeError(
            f"{out}: open_clip's embeddings differ from vlp's by {error:.2e} (a vlp bug)"
        )
    kept = {f"{parts.image_name}_global", "report"}
    return {
        "check": error,
        "model_cfg": model_cfg,
        "dropped": sorted(set(module.model.heads) - kept),
    }


# --------------------------------------------------------------------------- hf


def _layers(head, prefix: str) -> tuple[list[dict], dict]:
    """A ProjectionHead as JSON layers and their tensors (inference: dropout omitted)."""
    from torch import nn

    net = head.net
    modules = list(net) if isinstance(net, nn.Sequential) else [net]
    layers, tensors = [], {}

    def keep(index: int, name: str, tensor) -> str:
        key = f"{prefix}.{index}.{name}"
        tensors[key] = tensor.detach().float().contiguous()
        return key

    for index, layer in enumerate(modules):
        if isinstance(layer, (nn.Identity, nn.Dropout)):
            continue
        if isinstance(layer, nn.Linear):
            entry = {"type": "linear", "weight": keep(index, "weight", layer.weight)}
            entry["bias"] = keep(index, "bias", layer.bias) if layer.bias is not None else None
        elif isinstance(layer, nn.LayerNorm):
            entry = {"type": "layernorm", "eps": layer.eps}
            entry["weight"] = keep(index, "weight", layer.weight)
            entry["bias"] = keep(index, "bias", layer.bias)
        elif isinstance(layer, nn.BatchNorm1d):
            entry = {"type": "batchnorm", "eps": layer.eps}
            for name in ("weight", "bias", "running_mean", "running_var"):
                entry[name] = keep(index, name, getattr(layer, name))
        elif isinstance(layer, nn.GELU):
            entry = {"type": "gelu"}
        elif isinstance(layer, nn.ReLU):
            entry = {"type": "relu"}
        else:
            raise NotExpressible(f"cannot export to hf: head layer {type(layer).__name__}")
        layers.append(entry)
    return layers, tensors


HF_LOADING = """\
import json, PIL.Image, timm, torch, torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = "{folder}"
image_model = timm.create_model(f"local-dir:{{folder}}/image", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=image_model))
text_model = AutoModel.from_pretrained(f"{{folder}}/text").eval()
tokenizer = AutoTokenizer.from_pretrained(f"{{folder}}/text")
spec = json.load(open(f"{{folder}}/projections.json"))
weights = load_file(f"{{folder}}/projections.safetensors")


def project(x, head):
    for layer in spec["heads"][head]["layers"]:
        w = {{k: weights[v] for k, v in layer.items() if isinstance(v, str) and v in weights}}
        if layer["type"] == "linear":
            x = F.linear(x, w["weight"], w.get("bias"))
        elif layer["type"] == "layernorm":
            x = F.layer_norm(x, x.shape[-1:], w["weight"], w["bias"], layer["eps"])
        elif layer["type"] == "batchnorm":
            x = F.batch_norm(x, w["running_mean"], w["running_var"], w["weight"], w["bias"],
                             False, 0.0, layer["eps"])
        else:
            x = F.gelu(x) if layer["type"] == "gelu" else F.relu(x)
    return x


def pool(states, mask, how):
    if how == "cls":
        return states[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp_min(1)
    return states[torch.arange(len(states)), mask.cumsum(1).argmax(1)]  # last real token


with torch.no_grad():
    image = transform(PIL.Image.open("cxr.png").convert("L")).unsqueeze(0)  # 1 channel
    img = F.normalize(project(image_model(image), "image"), dim=-1)
    tokens = tokenizer(["small left pleural effusion"], padding=True, truncation=True,
                       max_length=spec["heads"]["text"]["max_length"], return_tensors="pt")
    states = text_model(**tokens).last_hidden_state
    txt = F.normalize(project(pool(states, tokens["attention_mask"],
                                   spec["heads"]["text"]["pooling"]), "text"), dim=-1)
    logits = spec["logit_scale"] * img @ txt.T
"""


def write_hf(module, cfg, out: Path) -> dict:
    """Write the Hugging Face folder ``out``; returns what the model card reports."""
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models import save_for_hf
    from transformers import AutoModel, AutoTokenizer

    parts, problems = _two_towers(module, "hf")
    if parts is None:
        raise NotExpressible("cannot export to hf: " + "; ".join(problems))
    tower_cfg = module.model.encoders[parts.image_name].config.tower
    from vlp.models.model import image_feature_keys

    local = module.model.heads[image_feature_keys(parts.image_name)[1]]
    heads = {"image": parts.image_head, "image_local": local, "text": parts.text_head}
    if parts.sentence_head is not None:
        heads["sentence"] = parts.sentence_head
    described, tensors = {}, {}
    for name, head in heads.items():
        layers, weights = _layers(head, name)
        tensors.update(weights)
        described[name] = {"in_dim": int(head.in_dim), "out_dim": int(head.out_dim)}
        described[name]["layers"] = layers
    described["image"]["input"] = (
        "the timm model in image/ (num_classes=0): model(x), i.e. forward_head(forward_features(x), "
        "pre_logits=True), on 1-channel images normalised by its pretrained_cfg mean/std"
    )
    described["image_local"]["input"] = (
        "the timm model's forward_features(x): a CNN map B x C x h x w flattened to "
        "B x (h*w) x C, or ViT tokens without their prefix (class) tokens"
    )
    text = parts.text
    for name, pooling in (("text", text.pooling), ("sentence", text.sentence_pooling)):
        if name in described:
            described[name]["input"] = "last_hidden_state of the model in text/, pooled"
            described[name]["pooling"] = pooling
            described[name]["max_length"] = int(text.max_length)
    objective = _clip_objective(module, [])
    scale = None
    if objective is not None:
        with torch.no_grad():
            scale = float(objective.logit_scale())
    spec = {
        "format": "vlp projections 1",
        "recipe": cfg.name,
        "normalize": True,
        "similarity": "cosine" if objective is not None else None,
        "logit_scale": scale,
        "note": None
        if objective is not None
        else "the recipe's objectives score with their own critics, which are not exported",
        "heads": described,
    }
    out.mkdir(parents=True, exist_ok=True)
    text.model.save_pretrained(out / "text")
    text.tokenizer.save_pretrained(out / "text")
    size = parts.image_size
    save_for_hf(
        parts.tower.model,
        out / "image",
        data_config={
            "input_size": (1, size, size),
            "mean": (float(tower_cfg.mean),),
            "std": (float(tower_cfg.std),),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        },
        safe_serialization=True,
    )
    save_file(tensors, str(out / PROJECTIONS), metadata={"format": "pt"})
    (out / PROJECTIONS_JSON).write_text(json.dumps(spec, indent=2) + "\n")
    # Equivalence of each piece, reloaded by timm and transformers as a user loads it.
    images = _probe(size)
    image_model = timm.create_model(f"local-dir:{out / 'image'}", pretrained=True).eval()
    text_model = AutoModel.from_pretrained(str(out / "text")).eval()
    tokens = AutoTokenizer.from_pretrained(str(out / "text"))(
        list(PROBE_TEXTS), padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        want = parts.tower(images).global_features
        x = (images.float() / 255 - float(tower_cfg.mean)) / float(tower_cfg.std)
        error = float((image_model(x) - want).abs().max() / want.abs().max().clamp_min(1e-12))
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        want = text.encode_tokens(ids, mask)
        got = text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        error = max(error, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    if error > CHECK_TOLERANCE:
        raise RuntimeError(f"{out}: reloaded towers differ from vlp's by {error:.2e} (a vlp bug)")
    kept = {"image_global", "image_local", "report", "sentence"}
    kept = {k.replace("image", parts.image_name, 1) if k.startswith("image") else k for k in kept}
    return {"check": error, "spec": spec, "dropped": sorted(set(module.model.heads) - kept)}


# --------------------------------------------------------------------------- card


def _step_of(folder: Path) -> int | None:
    match = re.fullmatch(r"step-(\d+)", Path(folder).name)
    return int(match.group(1)) if match else None


def eval_tables(run_dir: Path, evals: list | None = None) -> list[Path]:
    """The ``results.md`` files of the card: those ``evals`` names (files, or folders
    holding one), else every ``RUN_DIR/eval*/results.md`` (``vlp eval ... --out
    RUN_DIR/eval-NAME``)."""
    if evals:
        found = []
        for item in map(Path, evals):
            file = item / "results.md" if item.is_dir() else item
            if not file.is_file():
                raise FileNotFoundError(f"--eval {item}: no results.md there")
            found.append(file)
        return found
    return sorted(run_dir.glob("eval*/results.md"))


def _describe_encoders(model: dict) -> list[str]:
    from vlp.models.encoders import encoder_specs

    rows = []
    for name, (kind, params) in encoder_specs(model.get("encoders") or {}).items():
        tower = params.get("tower") or {}
        default = {"image": "resnet50", "text": "minilm"}.get(kind, "its default")
        what = f"`{name}`: kind `{kind}`, tower `{tower.get('name', default)}`"
        if kind == "text":
            what += f", pooling {tower.get('pooling', 'mean')}"
        if "view" in params:
            what += f", view {params['view']}"
        rows.append(what)
    return rows


_LOADING = {
    "vlp": (
        "`model.safetensors` + `config.yaml`: `vlp eval TASK --checkpoint {folder}`, or\n\n"
        "```python\nfrom vlp.training.export import load_model\n"
        'module, recipe = load_model("{folder}")\n```'
    ),
    "open_clip": (
        "open_clip's layout (`open_clip_config.json`, `open_clip_model.safetensors`, tokenizer, "
        "`hf_text/`), loaded with open_clip alone. The model takes grayscale images "
        "replicated to 3 channels (the preprocess does it); `hf_model_name` in "
        "`open_clip_config.json` is the absolute path of `hf_text/`: rewrite it after moving "
        "the folder.\n\n"
        "```python\nimport open_clip, torch\nfrom PIL import Image\n\n"
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")\n'
        "model.eval()  # open_clip returns it in train mode (BatchNorm would use batch stats)\n"
        'tokenizer = open_clip.get_tokenizer("local-dir:{folder}")\n'
        'image = preprocess(Image.open("cxr.png").convert("L")).unsqueeze(0)\n'
        "with torch.no_grad():\n"
        "    img = model.encode_image(image, normalize=True)\n"
        '    txt = model.encode_text(tokenizer(["small left pleural effusion"]), normalize=True)\n'
        "    logits = model.logit_scale.exp() * img @ txt.T\n```"
    ),
    "hf": (
        "`text/` (transformers `save_pretrained`), `image/` (timm `save_for_hf`, 1 input "
        "channel), `projections.safetensors` + `projections.json` (the heads as layers). "
        "transformers may report a BERT `pooler` as MISSING: vlp never uses it.\n\n"
        "```python\n" + HF_LOADING + "```"
    ),
}


def model_card(
    run_dir: Path, checkpoint: Path, fmt: str, out: Path, evals=None, extra: dict | None = None
) -> str:
    """The ``README.md`` of an export folder, from the run's ``config.yaml``."""
    import yaml

    from vlp.training.export import CONFIG

    recipe = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    data, model = recipe.get("data") or {}, recipe.get("model") or {}
    steps = _step_of(checkpoint)
    shards = data.get("shards") or ""
    if not shards:
        phantom = data.get("phantom") or {}
        shards = (
            f"phantom (vlp.data.phantom, {phantom.get('patients')} patients, "
            f"seed {phantom.get('seed')})"
        )
    projection = model.get("projection") or {}
    lines = [
        f"# {recipe.get('name', run_dir.name)}",
        "",
        recipe.get("description") or "(no description)",
        "",
        f"Exported by `vlp export --format {fmt}` from `{checkpoint}`.",
        "",
        "| | |",
        "|---|---|",
        f"| recipe | `{recipe.get('name')}` |",
        f"| steps trained | {steps if steps is not None else 'unknown'} |",
        f"| training data | `{shards}` |",
        f"| validation data | `{data.get('val_shards') or 'none'}` |",
        f"| image size | {data.get('image_size')} |",
        *(f"| encoder | {row} |" for row in _describe_encoders(model)),
        f"| projection | {projection.get('kind', 'linear')} (bias {projection.get('bias', True)}) to "
        f"{model.get('embed_dim')} dimensions; global head {model.get('global_head', 'pool')}, "
        f"text head {model.get('text_head', 'pool')} |",
        "| objectives | "
        + ", ".join(
            f"{o.get('name')} (weight {o.get('weight')})" for o in recipe.get("objectives") or []
        )
        + " |",
    ]
    if extra and extra.get("check") is not None:
        lines.append(f"| export check | largest difference from vlp {extra['check']:.1e} |")
    if extra and extra.get("dropped"):
        dropped = ", ".join(f"`{name}`" for name in extra["dropped"])
        lines.append(f"| heads not in this format | {dropped} |")
    lines += ["", "## Loading", "", _LOADING[fmt].format(folder=out)]
    tables = eval_tables(run_dir, evals)
    lines += ["", "## Evaluation", ""]
    if not tables:
        lines.append(f"No results.md under {run_dir}/eval*/ (or given with --eval).")
    for table in tables:
        lines += [f"### {table.parent.name}", "", table.read_text().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(run_dir, checkpoint, fmt, out, evals=None, extra=None) -> Path:
    path = Path(out) / CARD
    path.write_text(model_card(Path(run_dir), Path(checkpoint), fmt, Path(out), evals, extra))
    return path


# --------------------------------------------------------------------------- entry


WRITERS = {"open_clip": write_open_clip, "hf": write_hf}


def export_format(run_dir: Path, folder: Path, fmt: str, out=None, evals=None) -> Path:
    """Checkpoint ``folder`` of ``run_dir`` as format ``fmt`` into ``out`` (default
    ``RUN_DIR/export-FMT``), with its model card; returns ``out``."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    out = Path(out) if out is not None else run_dir / f"export-{fmt}"
    eval_tables(run_dir, evals)  # a bad --eval fails before the work
    module, cfg = _trained_module(run_dir, folder)
    extra = WRITERS[fmt](module, cfg, out)
    write_model_card(run_dir, folder, fmt, out, evals, extra)
    print(f"exported {folder} -> {out} ({fmt}; largest difference from vlp {extra['check']:.1e})")
    return out
