"""Pathology foundation-model tile encoders (ViTs built with timm), weights from local files only.

Each entry records what its model card publishes: the `timm.create_model` architecture and
arguments, the input size, the normalisation constants, the embedding rule and its dimension,
the parameter count the card states, the weights file the card distributes and the card's URL.
Nothing here downloads: every model is built with `pretrained=False` and weights come only from
a local file named in the config (`features.weights`), checked against an optional sha256.
Licence terms are the user's to accept on the card's page.

The entries (timm architecture, embedding rule, dimension, input size, weights file, card) are listed
in docs/encoders.md, which a test checks against this registry.

Input contract: like the ResNet encoders, a FoundationEncoder takes tiles normalised with the
ImageNet constants (what the pipeline's readers produce, slidetrain.wsi.encode.Normalizer); its
`transform` resizes them to the card's input size and re-normalises them to the card's constants,
so one reader serves every encoder.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slidetrain.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class FoundationSpec:
    name: str
    arch: str  # timm model name
    kwargs: dict  # timm.create_model arguments as the card gives them; "mlp_layer"/"act_layer" by name
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: str  # cls | cls+patch_mean | attn_pool
    dim: int
    params_card: float | None  # the count the card states, in parameters (rounded as the card rounds)
    params_card_text: str  # the card's own words for it
    params_exact: int  # what this registry builds (pinned: a timm or spec change shows in the tests)
    weights_file: str  # the file the card distributes
    card_url: str
    key_format: str = "timm"  # timm | hf_dinov2 | conch
    resize: str = "bicubic"  # interpolation of the card's Resize
    source: str = ""  # where the architecture arguments were read
    tiny: dict = field(default_factory=dict)  # overrides of the tiny same-family build used in tests
    params_tol: float = 0.0  # |built - card| allowed: half the unit the card rounds to (see each entry)


_TINY = {"embed_dim": 96, "depth": 2, "num_heads": 2}

FOUNDATION_SPECS: dict[str, FoundationSpec] = {
    s.name: s
    for s in [
        # https://huggingface.co/MahmoodLab/UNI (model card: timm.create_model("vit_large_patch16_224", img_size=224,
        # patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True); Resize 224, ImageNet constants;
        # "Params (M): 303"); same arguments in mahmoodlab/TRIDENT trident/patch_encoder_models/load.py (uni_v1).
        FoundationSpec(
            "uni",
            "vit_large_patch16_224",
            dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls",
            1024,
            303e6,
            "303M (ViT-L/16)",
            303_350_784,
            "pytorch_model.bin",
            "https://huggingface.co/MahmoodLab/UNI",
            params_tol=0.5e6,
            source="MahmoodLab/UNI model card; mahmoodlab/TRIDENT load.py UNIInferenceEncoder",
        ),
        # https://huggingface.co/MahmoodLab/UNI2-h (timm_kwargs on the card: vit_giant_patch14_224, img_size 224,
        # patch_size 14, depth 24, num_heads 24, init_values 1e-5, embed_dim 1536, mlp_ratio 2.66667*2,
        # num_classes 0, no_embed_class True, mlp_layer SwiGLUPacked, act_layer SiLU, reg_tokens 8,
        # dynamic_img_size True; ImageNet constants; "ViT-h/14-reg8, 681M").
        FoundationSpec(
            "uni2_h",
            "vit_giant_patch14_224",
            dict(
                img_size=224,
                patch_size=14,
                depth=24,
                num_heads=24,
                init_values=1e-5,
                embed_dim=1536,
                mlp_ratio=2.66667 * 2,
                num_classes=0,
                no_embed_class=True,
                mlp_layer="SwiGLUPacked",
                act_layer="SiLU",
                reg_tokens=8,
                dynamic_img_size=True,
            ),
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls",
            1536,
            681e6,
            "681M (ViT-h/14-reg8)",
            681_394_176,
            "pytorch_model.bin",
            "https://huggingface.co/MahmoodLab/UNI2-h",
            params_tol=0.5e6,
            source="MahmoodLab/UNI2-h model card; mahmoodlab/TRIDENT load.py UNIv2InferenceEncoder",
        ),
        # https://huggingface.co/paige-ai/Virchow2 (config: vit_huge_patch14_224, img_size 224, init_values 1e-5,
        # num_classes 0, reg_tokens 4, mlp_ratio 5.3375, global_pool "", dynamic_img_size True; the card adds
        # mlp_layer=SwiGLUPacked, act_layer=SiLU; embedding = concat(CLS, mean of patch tokens output[:, 5:]) ->
        # 2560; Resize 224 bicubic, ImageNet constants). The card and paper say 632M parameters; timm builds
        # 631.24M with these arguments (the paper's figure is the ViT-H/14 family size), so the contract test
        # checks the card's figure to 1M (0.16 %).
        FoundationSpec(
            "virchow2",
            "vit_huge_patch14_224",
            dict(
                img_size=224,
                init_values=1e-5,
                num_classes=0,
                reg_tokens=4,
                mlp_ratio=5.3375,
                global_pool="",
                dynamic_img_size=True,
                mlp_layer="SwiGLUPacked",
                act_layer="SiLU",
            ),
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls+patch_mean",
            2560,
            632e6,
            "632M (ViT-H/14)",
            631_239_424,
            "pytorch_model.bin",
            "https://huggingface.co/paige-ai/Virchow2",
            params_tol=1e6,
            source="paige-ai/Virchow2 model card and config.json; arXiv 2408.00738; TRIDENT Virchow2InferenceEncoder",
        ),
        # https://huggingface.co/bioptimus/H-optimus-0 (timm.create_model("hf-hub:bioptimus/H-optimus-0",
        # init_values=1e-5, dynamic_img_size=False); config: vit_giant_patch14_reg4_dinov2, img_size 224,
        # num_classes 0, global_pool "token"; Normalize mean (0.707223, 0.578729, 0.703617),
        # std (0.211883, 0.230117, 0.177517); "ViT-g/14, 1.1B parameters"; CLS token, 1536).
        FoundationSpec(
            "hoptimus0",
            "vit_giant_patch14_reg4_dinov2",
            dict(img_size=224, num_classes=0, global_pool="token", init_values=1e-5, dynamic_img_size=False),
            224,
            HOPTIMUS_MEAN,
            HOPTIMUS_STD,
            "cls",
            1536,
            1.1e9,
            "1.1B (ViT-g/14)",
            1_134_774_272,
            "pytorch_model.bin",
            "https://huggingface.co/bioptimus/H-optimus-0",
            params_tol=0.05e9,
            source="bioptimus/H-optimus-0 model card; TRIDENT HOptimus0InferenceEncoder",
        ),
        # https://huggingface.co/bioptimus/H-optimus-1 (same architecture and constants as H-optimus-0).
        FoundationSpec(
            "hoptimus1",
            "vit_giant_patch14_reg4_dinov2",
            dict(img_size=224, num_classes=0, global_pool="token", init_values=1e-5, dynamic_img_size=False),
            224,
            HOPTIMUS_MEAN,
            HOPTIMUS_STD,
            "cls",
            1536,
            1.1e9,
            "1.1B (ViT-g/14)",
            1_134_774_272,
            "pytorch_model.bin",
            "https://huggingface.co/bioptimus/H-optimus-1",
            params_tol=0.05e9,
            source="bioptimus/H-optimus-1 model card; TRIDENT HOptimus1InferenceEncoder",
        ),
        # https://huggingface.co/prov-gigapath/prov-gigapath (config: vit_giant_patch14_dinov2 with img_size 224,
        # in_chans 3, patch_size 16, embed_dim 1536, depth 40, num_heads 24, init_values 1e-5 (the timm
        # architecture's own), mlp_ratio 5.33334, num_classes 0; Resize 256 bicubic + CenterCrop 224,
        # ImageNet constants; tile encoder "1.1B"+ parameters, CLS 1536).
        FoundationSpec(
            "gigapath",
            "vit_giant_patch14_dinov2",
            dict(
                img_size=224,
                in_chans=3,
                patch_size=16,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                mlp_ratio=5.33334,
                num_classes=0,
            ),
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls",
            1536,
            1.13e9,
            "1.13B (ViT-g/14 tile encoder)",
            1_134_953_984,
            "pytorch_model.bin",
            "https://huggingface.co/prov-gigapath/prov-gigapath",
            params_tol=0.005e9,
            source="prov-gigapath/prov-gigapath model card and config.json; TRIDENT GigaPathInferenceEncoder",
        ),
        # https://huggingface.co/owkin/phikon-v2 (transformers Dinov2Model, ViT-L/16: hidden 1024, 24 layers,
        # 16 heads, patch 16, image 224, layer scale; CLS = last_hidden_state[:, 0]; Resize 224 + CenterCrop 224,
        # ImageNet constants; "ViT-L, 300M parameters"). Built as timm vit_large_patch16_224 with layer scale;
        # the HF key names are remapped (hf_dinov2_to_timm), the HF mask_token is not used at inference.
        FoundationSpec(
            "phikon_v2",
            "vit_large_patch16_224",
            dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls",
            1024,
            300e6,
            "300M (ViT-L/16)",
            303_350_784,
            "model.safetensors",
            "https://huggingface.co/owkin/phikon-v2",
            key_format="hf_dinov2",
            resize="bilinear",
            params_tol=5e6,
            source="owkin/phikon-v2 model card; TRIDENT Phikonv2InferenceEncoder",
        ),
        # https://huggingface.co/MahmoodLab/conchv1_5 (vision tower of TITAN's CONCH v1.5: ViT-L/16 trunk,
        # qkv bias, layer scale, LayerNorm eps 1e-6, then an attentional pooler with one query (d_model 768,
        # context 1024, 8 heads, bias-free projections) and a LayerNorm: 768-d; Resize 448 bilinear +
        # CenterCrop 448, ImageNet constants; file pytorch_model_vision.bin with keys trunk.*,
        # attn_pool_contrast.*, ln_contrast.*). Architecture as in TRIDENT's model_zoo/conchv1_5/conchv1_5.py.
        # The card gives no exact count ("ViT-L"); ours = trunk at 448 px (303.95M) + pooler (2.76M).
        FoundationSpec(
            "conch_v15",
            "vit_large_patch16_224",
            dict(img_size=448, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
            448,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "attn_pool",
            768,
            None,
            "not stated (ViT-L/16 trunk)",
            306_711_296,
            "pytorch_model_vision.bin",
            "https://huggingface.co/MahmoodLab/conchv1_5",
            key_format="conch",
            resize="bilinear",
            source="MahmoodLab/conchv1_5 and MahmoodLab/TITAN cards; TRIDENT model_zoo/conchv1_5/conchv1_5.py",
            tiny={"pool_dim": 64},
        ),
        # A tiny ViT for tests and CPU smoke runs: not a published model.
        FoundationSpec(
            "vit_tiny_test",
            "vit_tiny_patch16_224",
            dict(
                img_size=32,
                patch_size=16,
                embed_dim=96,
                depth=2,
                num_heads=2,
                init_values=1e-5,
                num_classes=0,
                dynamic_img_size=True,
            ),
            32,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls",
            96,
            None,
            "test model",
            298_656,
            "vit_tiny_test.safetensors",
            "(none: a test architecture)",
            source="slidetrain test architecture",
        ),
    ]
}
FOUNDATION_NAMES = tuple(FOUNDATION_SPECS)
#: entries that are slidetrain's own test architectures, not published models (benchmarks leave them out)
TEST_ONLY_NAMES = ("vit_tiny_test",)


def spec(name: str) -> FoundationSpec:
    if name not in FOUNDATION_SPECS:
        raise ConfigError(
            f"features.encoder: unknown foundation model {name!r}; expected one of {list(FOUNDATION_SPECS)}"
        )
    return FOUNDATION_SPECS[name]


def _resolve_kwargs(kwargs: dict) -> dict:
    from timm.layers import SwiGLUPacked

    named = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU}
    return {k: named.get(v, v) if k in ("mlp_layer", "act_layer") else v for k, v in kwargs.items()}


def _tiny_kwargs(s: FoundationSpec) -> dict:
    """The entry's arguments with width and depth cut (same family: patch, tokens, MLP kind, layer scale)."""
    kw = dict(s.kwargs)
    kw.update({k: v for k, v in _TINY.items()})
    return kw


def create_vit(s: FoundationSpec, tiny: bool = False) -> nn.Module:
    """The timm ViT of an entry, never pretrained (nothing is fetched)."""
    import timm

    kwargs = _resolve_kwargs(_tiny_kwargs(s) if tiny else s.kwargs)
    return timm.create_model(s.arch, pretrained=False, **kwargs)


class AttentionalPooler(nn.Module):
    """CoCa-style attentional pooling with learned queries (CONCH's `attn_pool_contrast`).

    tokens (B, N, context_dim) -> (B, n_queries, d_model); LayerNorms eps 1e-5, bias-free projections.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, C)
        b, n, _ = x.shape
        h = self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # (B, Q, D)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (B, N, D) each
        d = q.shape[-1] // h
        q, k, v = (t.reshape(b, t.shape[1], h, d).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).reshape(b, -1, h * d))  # (B, Q, D)


class ConchVisionTower(nn.Module):
    """CONCH v1.5's vision tower: ViT-L/16 trunk -> attentional pooler (1 query) -> LayerNorm."""

    def __init__(self, trunk: nn.Module, pool_dim: int = 768):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(pool_dim, trunk.embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(pool_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class CardTransform(nn.Module):
    """ImageNet-normalised tiles (B, 3, H, W) -> the card's input: resized to `size`, re-normalised to its mean/std."""

    def __init__(self, size: int, mean, std, mode: str = "bicubic"):
        super().__init__()
        self.size, self.mode = int(size), mode
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        im_mean, im_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_card = (x_imagenet * im_std + im_mean - mean) / std  =  x_imagenet * scale + shift
        scale = im_std / torch.tensor(self.std)
        shift = (im_mean - torch.tensor(self.mean)) / torch.tensor(self.std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = nn.functional.interpolate(
                x, size=(self.size, self.size), mode=self.mode, antialias=True, align_corners=False
            )
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class FoundationEncoder(nn.Module):
    """(B, 3, H, W) ImageNet-normalised tiles -> (B, dim) embeddings by the card's rule."""

    def __init__(self, s: FoundationSpec, model: nn.Module, dim: int):
        super().__init__()
        self.spec = s
        self.transform = CardTransform(s.input_size, s.mean, s.std, s.resize)
        self.model = model
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        if self.spec.embedding == "attn_pool":
            return self.model(x)
        tokens = self.model.forward_features(x)  # (B, prefix + patches, D), final norm applied
        cls = tokens[:, 0]
        if self.spec.embedding == "cls":
            return cls
        if self.spec.embedding == "cls+patch_mean":
            return torch.cat([cls, tokens[:, self.model.num_prefix_tokens :].mean(1)], dim=-1)
        raise ConfigError(f"{self.spec.name}: unknown embedding rule {self.spec.embedding!r}")


def build_architecture(name: str, tiny: bool = False) -> FoundationEncoder:
    """The entry at random init (build under `with torch.device("meta"):` to count without allocating)."""
    s = spec(name)
    vit = create_vit(s, tiny)
    if s.key_format == "conch":
        pool_dim = s.tiny.get("pool_dim", 64) if tiny else 768
        return FoundationEncoder(s, ConchVisionTower(vit, pool_dim), pool_dim)
    width = vit.embed_dim
    return FoundationEncoder(s, vit, 2 * width if s.embedding == "cls+patch_mean" else width)


# ---------------------------------------------------------------- weights


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _where(s: FoundationSpec) -> str:
    return f"the model card {s.card_url} distributes it as {s.weights_file!r} (its licence terms are yours to accept)"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights only), unwrapped from {'state_dict'|'model': ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not torch.is_tensor(state.get(key)):
            state = state[key]
    if not isinstance(state, dict):
        raise TypeError(f"expected a state dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.", "dinov2.", "vit.", "encoder.")
SUBMODEL_PREFIXES = ("visual.trunk.", "visual.", "trunk.", "image_encoder.", "vision_model.")
IGNORED_KEYS = ("mask_token", "embeddings.mask_token")  # DINOv2 training-only parameter


def hf_dinov2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF transformers Dinov2Model key names -> timm VisionTransformer's (q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "attention.output.dense": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
            continue
        if not key.startswith("encoder.layer."):
            out[key] = value  # left as is: reported as unexpected unless ignorable
            continue
        rest = key[len("encoder.layer.") :]
        idx, _, name = rest.partition(".")
        i = int(idx)
        if name.startswith("attention.attention."):
            part, _, kind = name[len("attention.attention.") :].partition(".")  # query|key|value, weight|bias
            qkv.setdefault((i, kind), {})[part] = value
            continue
        for hf, tm in block.items():
            if name == hf or name.startswith(hf + "."):
                out[f"blocks.{i}.{tm}{name[len(hf) :]}"] = value
                break
        else:
            out[key] = value
    for (i, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:
            for p, v in parts.items():
                out[f"encoder.layer.{i}.attention.attention.{p}.{kind}"] = v
    return out


def match_keys(state: dict[str, torch.Tensor], expected: set[str], key_format: str) -> tuple[dict, list[str]]:
    """Strip the prefixes published checkpoints carry, remap HF names; returns (state, keys left aside)."""
    remap = hf_dinov2_to_timm if key_format == "hf_dinov2" else (lambda d: d)

    def score(d: dict) -> int:
        return len(set(remap(d)) & expected)

    best, aside = state, []
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:  # the whole checkpoint sits under one wrapper name
            if best and all(k.startswith(p) for k in best):
                cand = {k[len(p) :]: v for k, v in best.items()}
                if score(cand) > score(best) or not score(best):
                    best, changed = cand, True
        for p in SUBMODEL_PREFIXES:  # a sub-model of a bigger checkpoint (e.g. open_clip's visual tower)
            sub = {k[len(p) :]: v for k, v in best.items() if k.startswith(p)}
            if sub and score(sub) > score(best):
                aside += [k for k in best if not k.startswith(p)]
                best, changed = sub, True
    return remap(best), aside


def load_weights(encoder: FoundationEncoder, path: str | Path, sha256: str | None = None) -> FoundationEncoder:
    """Load a local checkpoint into `encoder.model`; a missing file, sha256 or key mismatch is a WeightsError."""
    s = encoder.spec
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"features.weights for {s.name}: file {str(path)!r} does not exist; {_where(s)}")
    if sha256:
        got = sha256_of(path)
        if got.lower() != sha256.strip().lower():
            raise WeightsError(
                f"features.weights for {s.name}: {path} has sha256 {got}, expected {sha256.strip().lower()}; "
                f"the file is not the published checkpoint or is damaged; {_where(s)}"
            )
    try:
        state = read_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise WeightsError(
            f"features.weights for {s.name}: {path} cannot be read as a checkpoint ({err}); {_where(s)}"
        ) from err
    model = encoder.model
    expected = set(model.state_dict())
    state, aside = match_keys(state, expected, s.key_format)
    if aside:
        log.info("%s: %d keys outside the encoder left aside (e.g. %s)", s.name, len(aside), aside[:3])
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    vit = model.trunk if s.key_format == "conch" else model
    pe_key = "trunk.pos_embed" if s.key_format == "conch" else "pos_embed"
    if pe_key in state and state[pe_key].shape != vit.pos_embed.shape:  # a grid of another size: resample
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        side = (state[pe_key].shape[1] - prefix) ** 0.5
        if side == int(side) and state[pe_key].shape[-1] == vit.pos_embed.shape[-1]:  # else: reported below
            state[pe_key] = resample_abs_pos_embed(
                state[pe_key],
                new_size=vit.patch_embed.grid_size,
                num_prefix_tokens=prefix,
                interpolation="bilinear",
                antialias=False,
            )
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected or wrong:
        raise WeightsError(
            f"features.weights for {s.name}: {path} does not fit the {s.arch} architecture of {s.card_url}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(wrong)} of another shape {wrong[:3]}; {_where(s)}"
        )
    model.load_state_dict(state, strict=True)
    return encoder


def build_foundation(
    name: str, weights: str = "none", seed: int = 0, sha256: str | None = None, tiny: bool = False
) -> FoundationEncoder:
    """An entry with `weights` = none (random init, seeded: every process builds the same) or a local file."""
    s = spec(name)
    if weights in ("imagenet",):
        raise WeightsError(
            f"features.weights for {s.name}: 'imagenet' is for the ResNets; give the local file; {_where(s)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_architecture(name, tiny)
    if weights not in ("none", "", None):
        load_weights(encoder, weights, sha256)
    return encoder.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
