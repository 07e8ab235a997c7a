"""Contract of every registered foundation-model encoder: the model card's numbers, its checkpoint's keys, its errors.

Nothing here downloads: every model is built with timm `pretrained=False`, full-size models only on the
meta device (ViT-g has 1.1B parameters), and the checkpoints are tiny same-family models this test saves.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slidetrain.errors import ConfigError, WeightsError  # noqa: E402
from slidetrain.models.foundation import (  # noqa: E402
    FOUNDATION_SPECS,
    build_architecture,
    build_foundation,
    count_parameters,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))

# What each model card states, written down here independently of the registry:
# (parameters as the card rounds them, embedding dim, input size, (mean, std), weights file)
CARDS = {
    "uni": (303e6, 1024, 224, IMAGENET, "pytorch_model.bin"),  # "Params (M): 303"
    "uni2_h": (681e6, 1536, 224, IMAGENET, "pytorch_model.bin"),  # "ViT-h/14-reg8, 681M"
    "virchow2": (632e6, 2560, 224, IMAGENET, "pytorch_model.bin"),  # "632M"; CLS + mean patch tokens
    "hoptimus0": (1.1e9, 1536, 224, HOPTIMUS, "pytorch_model.bin"),  # "1.1B"
    "hoptimus1": (1.1e9, 1536, 224, HOPTIMUS, "pytorch_model.bin"),  # "1.1B"
    "gigapath": (1.13e9, 1536, 224, IMAGENET, "pytorch_model.bin"),  # tile encoder, ViT-g/14
    "phikon_v2": (300e6, 1024, 224, IMAGENET, "model.safetensors"),  # "ViT-L, 300M"
    "conch_v15": (None, 768, 448, IMAGENET, "pytorch_model_vision.bin"),  # 448 px, 768-d pooled
}
MODELS = [n for n in FOUNDATION_SPECS if n != "vit_tiny_test"]


def test_every_named_model_is_registered():
    assert set(CARDS) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_full_size_matches_the_card_on_meta(name):
    s = FOUNDATION_SPECS[name]
    card_params, dim, size, (mean, std), weights_file = CARDS[name]
    with torch.device("meta"):
        encoder = build_architecture(name)
        out = encoder(torch.empty(2, 3, size, size))
    n = count_parameters(encoder)
    assert n == s.params_exact  # pinned exactly (a timm upgrade that changes the architecture shows here)
    if card_params is not None:  # to the card's rounding (Virchow2: the card's 632M vs 631.24M built, 1M)
        assert abs(n - card_params) <= s.params_tol, (n, card_params)
    assert out.shape == (2, dim) and encoder.dim == dim == s.dim
    assert s.input_size == size and encoder.transform.size == size
    assert encoder.transform.mean == pytest.approx(mean) and encoder.transform.std == pytest.approx(std)
    assert s.weights_file == weights_file and s.card_url.startswith("https://huggingface.co/")


# ---- checkpoints in the published key layouts, from tiny same-family models


def _to_hf_dinov2(state: dict) -> dict:
    """timm ViT keys -> HF transformers Dinov2Model keys (what Phikon-v2's model.safetensors holds)."""
    out = {"embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    top = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    blk = {
        "norm1": "norm1",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "attn.proj": "attention.output.dense",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    for k, v in state.items():
        if k in top:
            out[top[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for part, t in zip(("query", "key", "value"), v.chunk(3, 0), strict=True):
                out[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = t.clone()
            continue
        for a, b in blk.items():
            if rest == a or rest.startswith(a + "."):
                out[f"encoder.layer.{i}.{b}{rest[len(a) :]}"] = v
                break
        else:
            raise AssertionError(k)
    return out


def _published(name: str, state: dict) -> list[tuple[str, dict]]:
    """The key layouts the model's published checkpoint (and common wrappers of it) use."""
    if name == "phikon_v2":
        hf = _to_hf_dinov2(state)
        return [("hf", hf), ("hf_in_wrapper", {f"dinov2.{k}": v for k, v in hf.items()})]
    if name == "conch_v15":  # pytorch_model_vision.bin: trunk.*, attn_pool_contrast.*, ln_contrast.*
        extra = {"text.token_embedding.weight": torch.zeros(3, 4), "logit_scale": torch.ones(())}
        return [("vision", state), ("coca_visual", {**{f"visual.{k}": v for k, v in state.items()}, **extra})]
    extra = {"visual.attn_pool.query": torch.zeros(2, 2), "text.proj": torch.zeros(2)}
    return [
        ("timm", state),
        ("module.", {f"module.{k}": v for k, v in state.items()}),
        ("model.", {f"model.{k}": v for k, v in state.items()}),
        ("backbone.", {f"backbone.{k}": v for k, v in state.items()}),
        ("visual.trunk.", {**{f"visual.trunk.{k}": v for k, v in state.items()}, **extra}),
    ]


@pytest.mark.parametrize("name", MODELS)
def test_published_key_layouts_load(name, tmp_path):
    torch.manual_seed(0)
    source = build_foundation(name, seed=1, tiny=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = source(x)
    for layout, state in _published(name, source.model.state_dict()):
        path = tmp_path / f"{layout}.{'safetensors' if name == 'phikon_v2' else 'bin'}"
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        loaded = build_foundation(name, str(path), seed=2, sha256=digest, tiny=True)
        with torch.no_grad():
            got = loaded(x)
        torch.testing.assert_close(got, want, msg=f"{name}: {layout}")


def test_a_checkpoint_of_another_grid_is_resampled(tmp_path):
    s = FOUNDATION_SPECS["conch_v15"]
    source = build_foundation("conch_v15", tiny=True)
    state = dict(source.model.state_dict())
    pe = state["trunk.pos_embed"]  # (1, 1 + 28 * 28, D) at 448 px; the checkpoint may carry a 14 x 14 grid
    cls, grid = pe[:, :1], pe[:, 1:].reshape(1, 28, 28, -1).permute(0, 3, 1, 2)
    small = (
        torch.nn.functional.interpolate(grid, size=(14, 14), mode="bilinear").permute(0, 2, 3, 1).reshape(1, 196, -1)
    )
    state["trunk.pos_embed"] = torch.cat([cls, small], 1)
    torch.save(state, tmp_path / s.weights_file)
    loaded = build_foundation("conch_v15", str(tmp_path / s.weights_file), tiny=True)
    assert loaded.model.trunk.pos_embed.shape == pe.shape


def test_missing_file_names_model_file_and_card(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with pytest.raises(WeightsError) as err:
        build_foundation("uni2_h", str(path), tiny=True)
    text = str(err.value)
    assert "uni2_h" in text and str(path) in text and "https://huggingface.co/MahmoodLab/UNI2-h" in text
    assert "pytorch_model.bin" in text
    assert isinstance(err.value, ConfigError)


def test_wrong_sha256_names_model_file_and_card(tmp_path):
    source = build_foundation("virchow2", tiny=True)
    path = tmp_path / "pytorch_model.bin"
    torch.save(source.model.state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_foundation("virchow2", str(path), sha256="0" * 64, tiny=True)
    text = str(err.value)
    assert "virchow2" in text and str(path) in text and "https://huggingface.co/paige-ai/Virchow2" in text
    assert hashlib.sha256(path.read_bytes()).hexdigest() in text


def test_checkpoint_of_another_model_lists_keys(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(build_foundation("uni", tiny=True).model.state_dict(), path)  # no register tokens
    with pytest.raises(WeightsError) as err:
        build_foundation("hoptimus0", str(path), tiny=True)
    text = str(err.value)
    assert "hoptimus0" in text and "missing keys" in text and "reg_token" in text
    assert "https://huggingface.co/bioptimus/H-optimus-0" in text


def test_transform_resizes_and_renormalises_to_the_card():
    enc = build_foundation("hoptimus0", tiny=True)
    # an ImageNet-normalised tile of one RGB colour c -> (c - card mean) / card std at the card's size
    c = torch.tensor([0.8, 0.5, 0.7]).view(1, 3, 1, 1)
    x = ((c - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)).expand(
        1, 3, 64, 64
    )
    y = enc.transform(x)
    assert y.shape == (1, 3, 224, 224)
    want = (c - torch.tensor(HOPTIMUS[0]).view(1, 3, 1, 1)) / torch.tensor(HOPTIMUS[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, want.expand_as(y), atol=1e-5, rtol=1e-5)


def test_nothing_is_fetched(monkeypatch):
    import timm

    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k.get("pretrained")) or real(*a, **k))
    build_foundation("vit_tiny_test")
    assert calls == [False]
