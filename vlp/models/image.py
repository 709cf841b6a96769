"""Image towers: 1-channel radiograph encoders that return global AND local features.

Every tower takes uint8 ``B×1×H×W`` images, normalises them inside ``forward`` (so the work
happens on the accelerator) and runs ONE forward pass that yields

* ``global``: ``B×Cg`` pooled feature,
* ``local``: ``B×R×Cl`` region features, ``R = gh·gw``,
* ``grid``: ``(gh, gw)``.

Registered towers (``vlp.registry`` kind ``image_tower``):

``timm``
    any timm model (``timm:<name>`` or a bare timm name), built with ``in_chans=1,
    num_classes=0``; local = ``forward_features`` (CNN map flattened, or ViT patch tokens
    without prefix tokens), global = ``forward_head(pre_logits=True)`` on the same features.
``open_clip``
    ``open_clip:<model>`` → ``open_clip.create_model(model, pretrained=None).visual``, the
    first RGB convolution summed to one channel; ``forward_intermediates`` gives the last
    block's map and the pooled embedding in one pass.
``liao_resnet256_5`` / ``liao_resnet256_6``
    the ResNets of Liao et al., "Multimodal Representation Learning via Maximization of Local
    Mutual Information", MICCAI 2021 (see :class:`LiaoResNet`).

Pretrained weights come only from a local file (``ImageTowerConfig.pretrained``); RGB
first-layer weights are summed to one channel (:func:`adapt_first_conv_to_grayscale`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from vlp.registry import register


@dataclass
class ImageTowerConfig:
    """Which image tower to build and how to feed it."""

    #: registered tower name (``liao_resnet256_6``), ``timm:<name>``, ``open_clip:<name>``,
    #: or a bare timm model name (``resnet50``).
    name: str = "resnet50"
    #: local file with weights (``.safetensors``, ``.pt``, ``.pth``, ``.bin``); None = random.
    pretrained: str | None = None
    #: intensity normalisation after scaling uint8 to [0, 1].
    mean: float = 0.5
    std: float = 0.25
    #: parameters of the registered tower, validated against its config dataclass.
    params: dict = field(default_factory=dict)


@dataclass
class TimmTowerParams:
    #: timm model name; filled from ``timm:<name>`` / bare names.
    model_name: str = ""
    #: ViT-style models are built for ``data.image_size``; a value here must equal it.
    img_size: int | None = None
    drop_path_rate: float = 0.0
    #: None keeps the model's default global pooling (avg for CNNs, class token for ViTs).
    global_pool: str | None = None
    #: extra keyword arguments for ``timm.create_model``.
    kwargs: dict = field(default_factory=dict)


@dataclass
class OpenClipTowerParams:
    #: open_clip model name; filled from ``open_clip:<name>``.
    model_name: str = ""
    #: the model is built for ``data.image_size`` (``force_image_size``); a value here
    #: must equal it.
    image_size: int | None = None


@dataclass
class LiaoResNetParams:
    """A plain BasicBlock ResNet: stem conv, then stages each halving the resolution."""

    stem_channels: int = 8
    stem_stride: int = 1
    stage_channels: list = field(default_factory=lambda: [8, 16, 32, 64, 128, 192])
    blocks_per_stage: list = field(default_factory=lambda: [2, 2, 2, 2, 2, 2])
    #: index (0-based) of the stage whose output is the local feature map.
    local_stage: int = 4
    #: ``avg2_flatten``: AvgPool 2×2 then flatten (Liao's 768-d global); ``mean``: global mean.
    global_pool: str = "avg2_flatten"


# --------------------------------------------------------------------------- helpers


def adapt_first_conv_to_grayscale(module: nn.Module) -> nn.Conv2d:
    """Replace the first 3-input-channel ``Conv2d`` of ``module`` by a 1-channel one.

    The new kernel is the sum of the RGB kernels, so on a gray image ``g`` the new conv gives
    exactly what the RGB conv gives on ``(g, g, g)``. Returns the new convolution.
    """
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d) and child.in_channels == 3:
            new = nn.Conv2d(
                1,
                child.out_channels,
                kernel_size=child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                dilation=child.dilation,
                groups=1,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            ).to(device=child.weight.device, dtype=child.weight.dtype)
            if child.groups != 1:
                raise ValueError(f"cannot adapt grouped first convolution {name!r} to grayscale")
            with torch.no_grad():
                new.weight.copy_(child.weight.sum(dim=1, keepdim=True))
                if child.bias is not None:
                    new.bias.copy_(child.bias)
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, new)
            return new
    raise ValueError(f"{type(module).__name__} has no Conv2d with 3 input channels to adapt")


def _read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    if "://" in path:
        raise FileNotFoundError(
            f"{what}: pretrained weights {path!r} are not a local file. Weights are never "
            "downloaded at run time: download them once, save the state dict to a file "
            "(.safetensors, .pt, .pth or .bin) and set `pretrained: /path/to/file`."
        )
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what}: pretrained weights {path!r} are not an existing local file. Hub names "
            "(e.g. 'openai', 'resnet50.a1_in1k') are never downloaded at run time: download "
            "the weights once, save the state dict to a local file (.safetensors, .pt, .pth "
            "or .bin) and set `pretrained: /path/to/file`, or null for random initialisation."
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path!r} does not hold a state dict")
    return state


def load_local_weights(module: nn.Module, path: str, strip_prefixes=("module.",)) -> None:
    """Load a local state dict into ``module``, adapting RGB input kernels to one channel.

    Keys the module does not have (classifier heads, a CLIP text tower) are ignored; keys
    the module has but the file lacks are an error, listing them.
    """
    what = type(module).__name__
    state = _read_state_dict(path, what)
    for prefix in strip_prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    own = module.state_dict()
    adapted = {}
    for key, value in state.items():
        if key not in own:
            continue
        target = own[key]
        if value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)  # RGB kernels → gray, as above
        if value.shape != target.shape:
            raise ValueError(
                f"{what}: weight {key!r} in {path!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(target.shape)}"
            )
        adapted[key] = value
    missing = sorted(set(own) - set(adapted))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{what}: {len(missing)} weights are missing from {path!r}: {shown} "
            "(is this a checkpoint of the same architecture?)"
        )
    module.load_state_dict(adapted, strict=True)


# --------------------------------------------------------------------------- towers


class ImageTowerOutput(NamedTuple):
    """What a tower returns. A named tuple, not a dataclass: ZeRO-3 attaches its
    pre-backward hooks (which gather a module's partitioned parameters again before its
    backward) to the tensors of the module's output, and it finds tensors in tuples, not
    in dataclasses. A timm ViT entered through ``forward_features`` has no hooked call of
    its own around ``pos_embed``/``cls_token``; without tensors in the tower's output
    their gradients met the partitioned (empty) parameters: "The size of tensor a (0)
    must match the size of tensor b (192)" in backward."""

    global_features: torch.Tensor  # B×Cg
    local_features: torch.Tensor  # B×R×Cl
    grid: tuple[int, int]


class ImageTower(nn.Module):
    """Base class: normalisation, shape checks and feature-size discovery."""

    global_dim: int
    local_dim: int

    def __init__(self, mean: float, std: float):
        super().__init__()
        if std <= 0:
            raise ValueError(f"image tower std must be positive, got {std}")
        self.register_buffer("pixel_mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(float(std)), persistent=False)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this tower) of parameters exempt from weight decay."""
        return set()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__} expects B×1×H×W images, got shape {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            x = images.float().div_(255.0)
        elif images.is_floating_point():
            x = images  # already in [0, 1]
        else:
            raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        dtype = next(self.parameters()).dtype
        return ((x - self.pixel_mean) / self.pixel_std).to(dtype)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From normalised images: (global B×Cg, local map B×Cl×gh×gw)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> ImageTowerOutput:
        pooled, local_map = self.features(self.normalize(images))
        batch, channels, gh, gw = local_map.shape
        local = local_map.reshape(batch, channels, gh * gw).transpose(1, 2)
        return ImageTowerOutput(pooled, local, (gh, gw))

    @torch.no_grad()
    def _discover_dims(self, image_size: int) -> None:
        was_training = self.training
        self.eval()
        probe = torch.zeros(1, 1, image_size, image_size, dtype=torch.uint8)
        out = self(probe)
        self.train(was_training)
        self.global_dim = int(out.global_features.shape[-1])
        self.local_dim = int(out.local_features.shape[-1])
        self.probe_grid = out.grid


class TimmTower(ImageTower):
    """Any timm model; one ``forward_features`` pass feeds both local and global outputs."""

    def __init__(self, cfg: ImageTowerConfig, params: TimmTowerParams, image_size: int):
        super().__init__(cfg.mean, cfg.std)
        import timm

        if not params.model_name:
            raise ValueError("timm image tower: set the model name, e.g. name: timm:resnet50")
        if params.img_size is not None and params.img_size != image_size:
            raise ValueError(
                f"params.img_size ({params.img_size}) disagrees with data.image_size "
                f"({image_size}): a recipe has one image size, set data.image_size only"
            )
        kwargs = dict(params.kwargs)
        if params.global_pool is not None:
            kwargs["global_pool"] = params.global_pool
        if params.drop_path_rate:
            kwargs["drop_path_rate"] = params.drop_path_rate

        def create(**extra):
            return timm.create_model(
                params.model_name, pretrained=False, in_chans=1, num_classes=0, **kwargs, **extra
            )

        try:
            # Models with position embeddings (ViTs) are sized for the recipe's images; the
            # others reject img_size in their constructor before building anything.
            try:
                self.model = create(img_size=image_size)
            except TypeError as err:
                if "img_size" not in str(err):
                    raise
                self.model = create()
        except RuntimeError as err:
            if "Unknown model" in str(err):
                close = difflib.get_close_matches(params.model_name, timm.list_models(), n=3)
                raise ValueError(
                    f"unknown timm model {params.model_name!r}; close names: {close}"
                ) from None
            raise
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.output_fmt = str(getattr(self.model, "output_fmt", "NCHW"))
        if cfg.pretrained:
            load_local_weights(self.model, cfg.pretrained)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in names()} if callable(names) else set()

    def _token_grid(self, height: int, width: int) -> tuple[int, int]:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        if patch_embed is not None and getattr(patch_embed, "grid_size", None) is not None:
            return tuple(patch_embed.grid_size)
        raise ValueError(f"cannot find the patch grid of timm model {type(self.model).__name__}")

    def features(self, x):
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 3:  # ViT-style tokens B×N×C
            gh, gw = self._token_grid(x.shape[-2], x.shape[-1])
            tokens = feats[:, self.num_prefix_tokens :]
            if tokens.shape[1] != gh * gw:
                raise ValueError(
                    f"timm model returned {tokens.shape[1]} patch tokens, grid is {gh}×{gw}"
                )
            local_map = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        elif feats.ndim == 4:
            local_map = feats.permute(0, 3, 1, 2) if self.output_fmt == "NHWC" else feats
        else:
            raise ValueError(f"unsupported timm feature shape {tuple(feats.shape)}")
        return pooled, local_map


class OpenClipTower(ImageTower):
    """open_clip's vision tower (``model.visual``) with a 1-channel first convolution."""

    def __init__(self, cfg: ImageTowerConfig, params: OpenClipTowerParams, image_size: int):
        super().__init__(cfg.mean, cfg.std)
        import open_clip

        if not params.model_name:
            raise ValueError("open_clip image tower: set name: open_clip:<model>, e.g. ViT-B-16")
        if params.model_name not in open_clip.list_models():
            close = difflib.get_close_matches(params.model_name, open_clip.list_models(), n=3)
            raise ValueError(f"unknown open_clip model {params.model_name!r}; close: {close}")
        if params.image_size is not None and params.image_size != image_size:
            raise ValueError(
                f"params.image_size ({params.image_size}) disagrees with data.image_size "
                f"({image_size}): a recipe has one image size, set data.image_size only"
            )
        clip = open_clip.create_model(
            params.model_name, pretrained=None, force_image_size=image_size
        )
        self.model = clip.visual
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"open_clip tower {params.model_name!r} ({type(self.model).__name__}) has no "
                "forward_intermediates; it cannot give local features"
            )
        if cfg.pretrained:
            _load_clip_visual(self.model, cfg.pretrained)
        adapt_first_conv_to_grayscale(self.model)

    def no_weight_decay(self) -> set[str]:
        names = {"positional_embedding", "class_embedding"}
        return {f"model.{n}" for n, _ in self.model.named_parameters() if n in names}

    def features(self, x):
        out = self.model.forward_intermediates(x, indices=1, normalize_intermediates=True)
        return out["image_features"], out["image_intermediates"][-1]


def _load_clip_visual(visual: nn.Module, path: str) -> None:
    """Load a full CLIP checkpoint (``visual.*`` keys) or a visual-only state dict."""
    state = _read_state_dict(path, "open_clip tower")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    own = visual.state_dict()
    for key, value in list(state.items()):
        if key in own and value.ndim == 4 and value.shape[1] == 3 and own[key].shape[1] == 1:
            state[key] = value.sum(dim=1, keepdim=True)
    visual.load_state_dict(state, strict=True)


class LiaoResNet(ImageTower):
    """BasicBlock ResNet of Liao et al. (MICCAI 2021) on 1×256×256 radiographs.

    The released code's ``ResNet256_6_2_1`` is a 3×3 stem (1→8 channels, stride 1) and six
    stages of two BasicBlocks, each halving the resolution, with 8, 16, 32, 64, 128, 192
    channels: stage 5 gives the 8×8×128 local map and stage 6 (4×4×192) → AvgPool 2×2 →
    flatten gives the 768-d global feature. The paper's local variant uses a 4×4×512 map;
    ``liao_resnet256_5`` reproduces that shape with a stride-2 stem and five stages.
    """

    def __init__(self, cfg: ImageTowerConfig, params: LiaoResNetParams, image_size: int = 256):
        super().__init__(cfg.mean, cfg.std)
        from torchvision.models.resnet import BasicBlock

        stages, blocks = list(params.stage_channels), list(params.blocks_per_stage)
        if len(stages) != len(blocks) or not stages:
            raise ValueError(
                f"liao resnet: stage_channels {stages} and blocks_per_stage {blocks} must be "
                "non-empty lists of the same length"
            )
        if not 0 <= params.local_stage < len(stages):
            raise ValueError(f"liao resnet: local_stage {params.local_stage} out of range")
        if params.global_pool not in ("avg2_flatten", "mean"):
            raise ValueError(
                f"liao resnet: global_pool must be avg2_flatten or mean, got {params.global_pool!r}"
            )
        self.local_stage = params.local_stage
        self.global_pool = params.global_pool
        self.stem = nn.Sequential(
            nn.Conv2d(1, params.stem_channels, 3, params.stem_stride, 1, bias=False),
            nn.BatchNorm2d(params.stem_channels),
            nn.ReLU(inplace=True),
        )
        layers, inplanes = [], params.stem_channels
        for planes, count in zip(stages, blocks):
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes)
            )
            stage = [BasicBlock(inplanes, planes, stride=2, downsample=downsample)]
            stage += [BasicBlock(planes, planes) for _ in range(count - 1)]
            layers.append(nn.Sequential(*stage))
            inplanes = planes
        self.stages = nn.ModuleList(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cfg.pretrained:
            load_local_weights(self, cfg.pretrained)

    def features(self, x):
        x = self.stem(x)
        local_map = None
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index == self.local_stage:
                local_map = x
        if self.global_pool == "mean":
            pooled = x.mean(dim=(2, 3))
        else:
            pooled = torch.flatten(nn.functional.avg_pool2d(x, 2), 1)
        return pooled, local_map


# --------------------------------------------------------------------------- registry


@register("image_tower", "timm", config=TimmTowerParams)
def build_timm_tower(params: TimmTowerParams, cfg: ImageTowerConfig, image_size: int) -> ImageTower:
    return TimmTower(cfg, params, image_size)


@register("image_tower", "open_clip", config=OpenClipTowerParams)
def build_open_clip_tower(
    params: OpenClipTowerParams, cfg: ImageTowerConfig, image_size: int
) -> ImageTower:
    return OpenClipTower(cfg, params, image_size)


@register("image_tower", "liao_resnet256_6", config=LiaoResNetParams)
def build_liao_resnet256_6(
    params: LiaoResNetParams, cfg: ImageTowerConfig, image_size: int
) -> ImageTower:
    """Released-code ResNet256_6_2_1: local 8×8×128, global 768."""
    return LiaoResNet(cfg, params, image_size)


@dataclass
class LiaoResNet5Params(LiaoResNetParams):
    """Five stages after a stride-2 stem: local and last map 4×4×512, global mean 512."""

    stem_channels: int = 16
    stem_stride: int = 2
    stage_channels: list = field(default_factory=lambda: [32, 64, 128, 256, 512])
    blocks_per_stage: list = field(default_factory=lambda: [2, 2, 2, 2, 2])
    local_stage: int = 4
    global_pool: str = "mean"


@register("image_tower", "liao_resnet256_5", config=LiaoResNet5Params)
def build_liao_resnet256_5(
    params: LiaoResNet5Params, cfg: ImageTowerConfig, image_size: int
) -> ImageTower:
    """The paper's local-MI encoder shape: 4×4×512 local features on 256×256 input."""
    return LiaoResNet(cfg, params, image_size)


def resolve_image_tower(name: str) -> tuple[str, dict]:
    """Map a config name to (registry name, params implied by the name)."""
    if name.startswith("open_clip:"):
        return "open_clip", {"model_name": name.split(":", 1)[1]}
    if name.startswith("timm:"):
        return "timm", {"model_name": name.split(":", 1)[1]}
    from vlp.registry import names

    if name in names("image_tower"):
        return name, {}
    return "timm", {"model_name": name}


def image_tower_config(
    cfg: ImageTowerConfig, path: str = "model.encoders.image.tower", source=None
):
    """(registry name, validated params) of the tower ``cfg.name`` names."""
    from vlp.registry import config_of

    registry_name, implied = resolve_image_tower(cfg.name)
    params = config_of(
        "image_tower", registry_name, {**implied, **cfg.params}, f"{path}.params", source
    )
    return registry_name, params


def build_image_tower(
    cfg: ImageTowerConfig, image_size: int, path: str = "model.encoders.image.tower"
) -> ImageTower:
    """Build the tower ``cfg.name`` names for ``image_size`` images; discover its sizes."""
    from vlp.registry import build

    registry_name, params = image_tower_config(cfg, path)
    tower = build("image_tower", registry_name, params, cfg, image_size)
    tower._discover_dims(image_size)
    return tower
