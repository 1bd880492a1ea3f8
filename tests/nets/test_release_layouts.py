"""Key layouts of every released file bir loads, and each file's loading path.

1. For each network, bir's module (real size, meta device: no memory) must have exactly the key
   names and shapes of the released module the file was saved from. The facts below were listed
   by building the released modules on the meta device: DiffBIR at 3f8b530 (``diffbir/model``,
   ``configs/inference/*.yaml``) and, for the v1 full checkpoints, DiffBIR v1 at 8ad952e
   (``model/cldm.py``, ``configs/model/cldm.yaml``); the scripts are kept outside the repository
   (``/work/parity/stage1nets/layouts_v2.py``, ``layouts_v1.py``, ``facts.py``). A digest is the
   first 16 hex digits of sha256 over the sorted ``"key:(shape)"`` lines.
2. For each released file, a meta-device state dict in the file's layout (its wrapping, prefixes
   and extra keys) goes through bir's real loader at real size; only reading the file is replaced.
3. For each released file, a tiny random network saved with ``torch.save`` in the file's format
   loads through bir's loader from the path, strictly, with every tensor equal.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import bir.nets.checkpoints as checkpoints_module
from bir.cli import CONFIG_DIR
from bir.lit.stage2 import load_stage1
from bir.nets.controlldm import ControlLDM

NET_CONF = Path(CONFIG_DIR) / "net"

# ---------------------------------------------------------------------------- release facts
#: network -> (state-dict entries, elements, digest of names and shapes), as released
RELEASE_LAYOUTS = {
    "unet": (686, 865_910_724, "d19ba7c420123107"),  # SD 2.1 UNet (openaimodel)
    "vae": (248, 83_653_863, "4f793f3406f6a4b0"),  # SD KL-f8 AutoencoderKL
    "clip": (294, 354_032_641, "d10a5a7b2e38d0a6"),  # OpenCLIP ViT-H text tower (no visual)
    "controlnet": (324, 363_153_280, "d54042ffa5c3ded8"),  # DiffBIR IRControlNet
    "cond_encoder": (108, 34_163_664, "33f565026a0536da"),  # v1: VAE encoder + quant_conv copy
    "swinir": (732, 22_280_651, "2d01416c5933ba76"),  # with 48 index and 24 mask buffers
    "bsrnet": (702, 16_697_987, "128c99fd00f08e8e"),  # RRDBNet nf 64, nb 23, gc 32, x4
    "scunet": (540, 17_946_072, "638e61606239dc6f"),  # SCUNet [4]*7, dim 64
}

#: a few named shapes per network, readable next to the release code
RELEASE_SHAPES = {
    "unet": {
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 1024),
        "out.2.weight": (4, 320, 3, 3),
    },
    "vae": {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    },
    "clip": {
        "token_embedding.weight": (49408, 1024),
        "positional_embedding": (77, 1024),
        "text_projection": (1024, 1024),
        "logit_scale": (),
        "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
    },
    "controlnet": {
        "input_blocks.0.0.weight": (320, 8, 3, 3),
        "zero_convs.0.0.weight": (320, 320, 1, 1),
        "zero_convs.11.0.weight": (1280, 1280, 1, 1),
        "middle_block_out.0.weight": (1280, 1280, 1, 1),
    },
    "cond_encoder": {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
    },
    "swinir": {
        "conv_first.1.weight": (180, 192, 3, 3),
        "layers.0.residual_group.blocks.0.attn.relative_position_index": (64, 64),
        "layers.0.residual_group.blocks.1.attn_mask": (64, 64, 64),
        "layers.7.residual_group.blocks.5.attn.relative_position_bias_table": (225, 6),
        "conv_up3.weight": (64, 64, 3, 3),
        "conv_last.weight": (3, 64, 3, 3),
    },
    "bsrnet": {
        "conv_first.weight": (64, 3, 3, 3),
        "RRDB_trunk.22.RDB3.conv5.weight": (64, 192, 3, 3),
        "upconv2.weight": (64, 64, 3, 3),
        "HRconv.weight": (64, 64, 3, 3),
        "conv_last.weight": (3, 64, 3, 3),
    },
    "scunet": {
        "m_head.0.weight": (64, 3, 3, 3),
        "m_down1.4.weight": (128, 64, 2, 2),
        "m_body.3.trans_block.msa.relative_position_params": (8, 15, 15),
        "m_body.0.trans_block.msa.embedding_layer.weight": (768, 256),
        "m_up3.0.weight": (512, 256, 2, 2),
        "m_up1.4.conv1_2.weight": (64, 64, 1, 1),
        "m_tail.0.weight": (3, 64, 3, 3),
    },
}

#: keys a released file has that bir's loader drops on purpose (name -> shape)
DROPPED = {"clip": {"logit_scale": ()}}  # the full-CLIP temperature; bir keeps the text tower

#: ldm LatentDiffusion's schedule buffers, present in ldm checkpoints and ignored by bir
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

SD_PARTS = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.model.": "clip",
}


@dataclass(frozen=True)
class ReleasedFile:
    """How a released file is laid out and which bir loader reads it.

    ``wrapper``: None for a bare state dict, else the top-level key holding it (Lightning /
    ldm ``"state_dict"``). ``parts``: key prefix -> network. ``extras``: further top-level keys
    (shape (1000,)) that the loader must ignore. ``loader``: sd | control | v1_full | stage1.
    """

    wrapper: str | None
    parts: dict[str, str]
    loader: str
    extras: tuple[str, ...] = ()
    stage1: str | None = None  # stage-1 network for loader "stage1" / "v1_full"


RELEASED_FILES = {
    # SD 2.1-base (ldm checkpoint): read by ControlLDM(sd_ckpt_path=...) for v1 / v2 presets
    "v2-1_512-ema-pruned.ckpt": ReleasedFile("state_dict", SD_PARTS, "sd", SCHEDULE_BUFFERS),
    # DiffBIR v2.1's zero-terminal-SNR SD 2.1-base: same layout as SD 2.1
    "sd2.1-base-zsnr-laionaes5.ckpt": ReleasedFile("state_dict", SD_PARTS, "sd", SCHEDULE_BUFFERS),
    # control-only dicts (the release loads all four strictly into the same IRControlNet)
    "v2.pth": ReleasedFile(None, {"": "controlnet"}, "control"),
    "DiffBIR_v2.1.pt": ReleasedFile(None, {"": "controlnet"}, "control"),
    "v1_general.pth": ReleasedFile(None, {"": "controlnet"}, "control"),
    "v1_face.pth": ReleasedFile(None, {"": "controlnet"}, "control"),
    # DiffBIR v1 Lightning checkpoints: the whole v1 ControlLDM
    **{
        name: ReleasedFile(
            "state_dict",
            {
                "control_model.": "controlnet",
                **SD_PARTS,
                "cond_encoder.": "cond_encoder",
                "preprocess_model.": "swinir",
            },
            "v1_full",
            (*SCHEDULE_BUFFERS, "logvar"),
            stage1="swinir",
        )
        for name in ("general_full_v1.ckpt", "face_full_v1.ckpt")
    },
    # stage-1 SwinIR (v1 Lightning training; the release unwraps "state_dict")
    "general_swinir_v1.ckpt": ReleasedFile("state_dict", {"": "swinir"}, "stage1", stage1="swinir"),
    "face_swinir_v1.ckpt": ReleasedFile("state_dict", {"": "swinir"}, "stage1", stage1="swinir"),
    # DiffBIR v2.1's SR / denoise SwinIR (not in issue 16's list; its presets use it): v2's
    # train_stage1.py saves the bare state dict, which the release loads strictly into SwinIR
    "realesrgan_s4_swinir_100k.pth": ReleasedFile(None, {"": "swinir"}, "stage1", stage1="swinir"),
    # KAIR releases, bare state dicts
    "BSRNet.pth": ReleasedFile(None, {"": "bsrnet"}, "stage1", stage1="bsrnet"),
    "scunet_color_real_psnr.pth": ReleasedFile(None, {"": "scunet"}, "stage1", stage1="scunet"),
}


def digest(layout: dict[str, tuple[int, ...]]) -> str:
    lines = "\n".join(f"{k}:{tuple(s)}" for k, s in sorted(layout.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def shapes(module_or_state) -> dict[str, tuple[int, ...]]:
    state = (
        module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    )
    return {k: tuple(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------------- bir's networks
@contextlib.contextmanager
def meta_device():
    """Build on the meta device; SwinIR reads its drop-path rates from torch.linspace with
    ``.tolist()``, which a meta tensor cannot do, so linspace alone stays on the CPU."""
    linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        return linspace(*args, **{**kwargs, "device": "cpu"})

    with pytest.MonkeyPatch.context() as mp, torch.device("meta"):
        mp.setattr(torch, "linspace", cpu_linspace)
        yield


@functools.cache
def net_config(name: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"net={name}"]).net


def instantiate_net(name: str, **overrides):
    """Instantiate ``conf/net/<name>.yaml`` (composed once per session)."""
    return hydra.utils.instantiate(net_config(name), **overrides)


def v1_condition_encoder(vae: nn.Module) -> nn.Module:
    """The module ControlLDM builds for a v1 full checkpoint's ``cond_encoder.*``."""
    return nn.Sequential(
        OrderedDict(encoder=copy.deepcopy(vae.encoder), quant_conv=copy.deepcopy(vae.quant_conv))
    )


@pytest.fixture(scope="module")
def real_size() -> dict[str, nn.Module]:
    """bir's networks from the real configs, at released size, on the meta device."""
    with meta_device():
        ldm = instantiate_net("controlnet_sd21", sd_ckpt_path=None, control_ckpt_path=None)
        nets = {
            "ldm": ldm,
            "swinir": instantiate_net("swinir_diffbir"),
            "bsrnet": instantiate_net("bsrnet"),
            "scunet": instantiate_net("scunet"),
            "cond_encoder": v1_condition_encoder(ldm.vae),
        }
    nets |= {"unet": ldm.unet, "vae": ldm.vae, "clip": ldm.clip.model, "controlnet": ldm.controlnet}
    return nets


def file_layout(nets: dict[str, nn.Module], spec: ReleasedFile) -> dict[str, tuple[int, ...]]:
    """The released file's flattened keys and shapes, built from bir's modules."""
    layout = {}
    for prefix, net in spec.parts.items():
        layout |= {prefix + k: s for k, s in (shapes(nets[net]) | DROPPED.get(net, {})).items()}
    return layout | {k: (1000,) for k in spec.extras}


# ------------------------------------------------------------------------------ 1. layouts
@pytest.mark.parametrize("net", sorted(RELEASE_LAYOUTS))
def test_bir_network_has_the_released_key_layout(real_size, net):
    layout = shapes(real_size[net]) | DROPPED.get(net, {})
    n_keys, n_elements, expected_digest = RELEASE_LAYOUTS[net]
    for key, shape in RELEASE_SHAPES[net].items():
        assert layout.get(key) == shape, f"{net}: {key} is {layout.get(key)}, released {shape}"
    assert len(layout) == n_keys
    assert sum(torch.Size(s).numel() for s in layout.values()) == n_elements
    assert digest(layout) == expected_digest


def test_derived_bsrnet_layout_from_the_architecture(real_size):
    # the ESRGAN structure written out: 5 convs per dense block, 3 blocks per RRDB, 23 RRDBs
    convs = {
        "conv_first": (64, 3),
        "trunk_conv": (64, 64),
        "upconv1": (64, 64),
        "upconv2": (64, 64),
        "HRconv": (64, 64),
        "conv_last": (3, 64),
    }
    for i in range(23):
        for j in (1, 2, 3):
            for k in range(1, 6):
                cin = 64 + (k - 1) * 32
                convs[f"RRDB_trunk.{i}.RDB{j}.conv{k}"] = (64 if k == 5 else 32, cin)
    expected = {}
    for name, (cout, cin) in convs.items():
        expected |= {f"{name}.weight": (cout, cin, 3, 3), f"{name}.bias": (cout,)}
    assert shapes(real_size["bsrnet"]) == expected
    assert digest(expected) == RELEASE_LAYOUTS["bsrnet"][2]


# ------------------------------------------------------- 2. real-size loading (meta tensors)
def meta_state(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


@pytest.mark.parametrize("filename", sorted(RELEASED_FILES))
def test_released_layout_loads_strictly_at_real_size(real_size, filename, monkeypatch):
    spec = RELEASED_FILES[filename]
    layout = file_layout(real_size, spec)
    for prefix, net in spec.parts.items():  # the file matches the release group by group
        part = {k[len(prefix) :]: s for k, s in layout.items() if k.startswith(prefix)}
        if not prefix:
            part = {k: s for k, s in part.items() if k not in spec.extras}
        assert digest(part) == RELEASE_LAYOUTS[net][2], f"{filename}: {prefix or 'bare'} {net}"
    state = meta_state(layout)
    ldm = real_size["ldm"]
    if spec.loader == "sd":
        ldm.load_sd_weights(state, name=filename)
    elif spec.loader == "control":
        ldm.load_control_weights(state, name=filename)
    elif spec.loader == "v1_full":
        with torch.device("meta"):
            ldm.load_control_weights(state, name=filename)
        assert ldm.cond_encoder is not None  # v1's own condition encoder was loaded
        ldm.cond_encoder = None
    if spec.stage1 is not None:
        # the stage-1 loader DiffBIR / stage-2 use, with reading the file replaced
        monkeypatch.setattr(checkpoints_module, "load_checkpoint", lambda *a, **k: state)
        load_stage1(real_size[spec.stage1], filename, "method.stage1_ckpt_path")
        # and the one loader of every network (method=swinir's), from a bare release file
        if spec.parts == {"": spec.stage1}:
            checkpoints_module.load_net(real_size[spec.stage1], filename)


def test_released_layout_with_a_key_missing_is_refused(real_size):
    from bir.nets.checkpoints import CheckpointMismatchError

    state = meta_state(file_layout(real_size, RELEASED_FILES["v2.pth"]))
    del state["zero_convs.5.0.bias"]
    with pytest.raises(CheckpointMismatchError, match="zero_convs.5.0.bias"):
        real_size["ldm"].load_control_weights(state, name="v2.pth")


# ------------------------------------------------------- 3. tiny files through torch.save
TINY = {"swinir": "swinir_tiny", "bsrnet": "bsrnet_tiny", "scunet": "scunet_tiny"}


def randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def tiny_ldm(seed: int, **overrides) -> ControlLDM:
    torch.manual_seed(seed)
    return instantiate_net("controlnet_tiny", **overrides)


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def save_release_format(path: Path, spec: ReleasedFile, nets: dict[str, nn.Module]) -> None:
    state = {}
    for prefix, net in spec.parts.items():
        module = nets[net]
        part = module.state_dict() | {k: torch.tensor(4.6052) for k in DROPPED.get(net, {})}
        state |= {prefix + k: v for k, v in part.items()}
    state |= {k: torch.linspace(0, 1, 1000) for k in spec.extras}
    obj = state if spec.wrapper is None else {spec.wrapper: state, "global_step": 1, "epoch": 0}
    torch.save(obj, path)


def distinct_formats() -> list:
    """One case per distinct file format (files with the same layout share one)."""
    groups: dict[str, list[str]] = {}
    for name, spec in RELEASED_FILES.items():
        groups.setdefault(repr(spec), []).append(name)
    return [pytest.param(names[0], id="|".join(names)) for names in groups.values()]


@pytest.mark.parametrize("filename", distinct_formats())
def test_tiny_file_in_the_release_format_loads_through_bir(tmp_path, filename):
    spec = RELEASED_FILES[filename]
    src_ldm = tiny_ldm(seed=1)
    randomise(src_ldm.controlnet, 2)
    nets = {
        "unet": src_ldm.unet,
        "vae": src_ldm.vae,
        "clip": src_ldm.clip.model,
        "controlnet": src_ldm.controlnet,
        "cond_encoder": randomise(v1_condition_encoder(src_ldm.vae), 3),
    }
    if spec.stage1 is not None:
        torch.manual_seed(4)
        nets[spec.stage1] = randomise(instantiate_net(TINY[spec.stage1]), 5)
    path = tmp_path / filename
    save_release_format(path, spec, nets)

    if spec.loader == "sd":
        dst = tiny_ldm(seed=7, sd_ckpt_path=str(path))
        for name in ("unet", "vae"):
            assert_same_tensors(getattr(dst, name), nets[name])
        assert_same_tensors(dst.clip.model, nets["clip"])
    elif spec.loader in ("control", "v1_full"):
        dst = tiny_ldm(seed=7, control_ckpt_path=str(path))
        assert_same_tensors(dst.controlnet, nets["controlnet"])
        if spec.loader == "v1_full":
            assert_same_tensors(dst.unet, nets["unet"])
            assert_same_tensors(dst.cond_encoder, nets["cond_encoder"])
    if spec.stage1 is not None:
        torch.manual_seed(8)
        fresh = instantiate_net(TINY[spec.stage1])
        assert_same_tensors(
            load_stage1(fresh, str(path), "method.stage1_ckpt_path"), nets[spec.stage1]
        )
        if spec.parts == {"": spec.stage1}:
            cfg = OmegaConf.to_container(OmegaConf.load(NET_CONF / f"{TINY[spec.stage1]}.yaml"))
            cls = hydra.utils.get_class(cfg.pop("_target_"))
            loaded = checkpoints_module.load_net(cls(**cfg), path)
            assert_same_tensors(loaded, nets[spec.stage1])


def test_control_dict_saved_from_data_parallel_loads(tmp_path):
    # the release's reader strips "module."; bir's control loader accepts it too
    src = randomise(tiny_ldm(seed=1).controlnet, 2)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "v2.pth")
    assert_same_tensors(
        tiny_ldm(seed=3, control_ckpt_path=str(tmp_path / "v2.pth")).controlnet, src
    )
