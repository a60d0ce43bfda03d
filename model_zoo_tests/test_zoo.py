"""Model-zoo sweep: trace, split exactly and train the suffix of timm and torchvision CNNs.

Every model of `torchvision.models.list_models(module=torchvision.models)` and a spread of timm
CNN families, with random (never hub) weights. Per model: it traces with at least one cut point;
at up to 8 evenly spaced cut points `suffix(prefix(x))` equals `model(x)` bit for bit (eval, fp32,
CPU); one training step of the suffix gives every trainable suffix parameter a gradient while the
prefix stays frozen. Run with `pytest model_zoo_tests -q` (or `-m zoo`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_bn, randomize_zero_init
from torch import nn

import fxdrop

pytestmark = [
    pytest.mark.zoo,
    # reason: torchvision's googlenet/inception_v3 announce a future change of their random init
    pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning"),
]

BATCH = 2  # reason: the smallest batch on which train-mode BatchNorm works
DEFAULT_SIZE = 64  # px; the smallest input every model below accepts unless INPUT_SIZE says otherwise
MAX_CHECKED_CUTS = 8  # evenly spaced cut points checked for exactness in deep models
AUX_WEIGHT = 0.3  # weight of auxiliary-head losses (GoogLeNet's), so aux heads get gradients too

# The smallest, or only, variant of each timm CNN family, plus a few deeper ones.
TIMM_MODELS = [
    # ResNet and its variants (-d: deep stem + avg-pool downsample, -t: tiered stem)
    "resnet10t",
    "resnet18",
    "resnet18d",
    "resnet26t",
    "resnet50",
    "resnet50d",
    "resnext26ts",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "seresnet18",
    "seresnext26d_32x4d",
    "ecaresnet26t",
    "skresnet18",
    "resnest14d",
    "resnetrs50",
    "resnetv2_18",
    "gcresnet33ts",
    "res2net50_14w_8s",
    "res2next50",
    "nf_resnet26",
    "tresnet_m",
    "legacy_seresnet18",
    "resnet50_gn",
    "resnetv2_50d_frn",
    "resnetv2_50x1_bit",
    "resnet51q",
    # plain stacks
    "vgg11",
    "vgg11_bn",
    "repvgg_a0",
    "mobileone_s0",
    # dense connectivity
    "densenet121",
    "densenetblur121d",
    "dla34",
    "dla46_c",
    "dpn48b",
    "dpn68",
    "selecsls42b",
    "ese_vovnet19b_dw",
    "hrnet_w18_small",
    "vovnet39a",
    "nasnetalarge",
    "pnasnet5large",
    # inverted residuals / NAS
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnetv2_rw_t",
    "tinynet_e",
    "mobilenetv2_035",
    "mobilenetv2_100",
    "mobilenetv3_small_050",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "mnasnet_050",
    "fbnetc_100",
    "spnasnet_100",
    "mixnet_s",
    "lcnet_050",
    "hardcorenas_a",
    "ghostnet_050",
    "ghostnetv2_100",
    "ghostnetv3_050",
    "repghostnet_050",
    "rexnet_100",
    "rexnetr_100",
    "fbnetv3_b",
    "lcnetv2_small",
    "repvit_m0_9",
    "fastvit_t8",
    # RegNet family
    "regnetx_002",
    "regnety_002",
    "regnetz_005",
    "nf_regnet_b0",
    "regnetv_040",
    "eca_nfnet_l0",
    "dm_nfnet_f0",
    # ConvNeXt and other modern CNNs
    "convnext_atto",
    "convnextv2_atto",
    "inception_next_atto",
    "edgenext_xx_small",
    "hgnet_tiny",
    "hgnetv2_b0",
    "gernet_s",
    "poolformerv2_s12",
    "convmixer_768_32",
    # Inception / Xception
    "inception_v3",
    "inception_v4",
    "inception_resnet_v2",
    "xception41",
    "legacy_xception",
    # CSP / DarkNet
    "cspresnet50",
    "cspresnext50",
    "cspdarknet53",
    "darknet17",
    "darknet53",
    "cs3darknet_s",
    # attention inside a CNN body, conv/transformer hybrids
    "botnet26t_256",
    "halonet26t",
    "coatnet_nano_rw_224",
    "levit_conv_128s",
    "mobilevit_xxs",
    "efficientvit_b0",
]

TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)

# Input side for models that reject DEFAULT_SIZE (too small for their strides and kernels).
INPUT_SIZE: dict[str, int] = {
    "timm:inception_v3": 75,  # reason: Mixed_7a's 3x3 stride-2 convs need >= 3x3 there
    "timm:inception_v4": 75,  # reason: same valid 3x3 convs late in the network
    "timm:inception_resnet_v2": 75,  # reason: same valid 3x3 convs late in the network
    "timm:halonet26t": 256,  # reason: halo attention needs the stride-32 map divisible by its 8x8 blocks
    "torchvision:inception_v3": 299,  # reason: the train-mode aux head's 5x5 conv needs Mixed_6e at 17x17
    "torchvision:maxvit_t": 224,  # reason: 7x7 window/grid partitions in all 4 stages; partition_size is fixed
}

# Constructor arguments; the layers stay the model's own.
BUILD_KWARGS: dict[str, dict] = {
    # reason: torchvision's VisionTransformer takes image_size as a constructor argument (224 by
    # default, then asserted in forward); two patches per side only shortens the position
    # embedding, and keeps vit_h_14 (632M parameters) affordable on a CPU.
    "torchvision:vit_b_16": {"image_size": 32},
    "torchvision:vit_b_32": {"image_size": 64},
    "torchvision:vit_l_16": {"image_size": 32},
    "torchvision:vit_l_32": {"image_size": 64},
    "torchvision:vit_h_14": {"image_size": 28},
    # reason: these timm models size position biases / attention from img_size at construction
    "timm:botnet26t_256": {"img_size": 64},
    "timm:coatnet_nano_rw_224": {"img_size": 64},
    "timm:levit_conv_128s": {"img_size": 64},
}
INPUT_SIZE.update({spec: kw.get("image_size", kw.get("img_size")) for spec, kw in BUILD_KWARGS.items()})

# Models whose eval forward is reproducible only to the last bits on some CPUs: the same input
# through the same weights, in another buffer, gives a result a few ulps off (the kernels' vector
# paths depend on memory alignment). The split is then checked to that tolerance. Every entry has
# a reason.
LAST_BITS: dict[str, str] = {
    # reason: measured on this project's CPU (2026-11-25): the whole model and its split at cut 19
    # differ by 1-2e-6 in one process and not in another, at the base commit too
    "timm:botnet26t_256": "its attention's matmul and softmax on 2x2 maps",
}

# Models the sweep does not run. Every entry has a reason.
EXCLUDE: dict[str, str] = {}


def _specs() -> list:
    specs = [f"timm:{n}" for n in TIMM_MODELS] + [f"torchvision:{n}" for n in TORCHVISION_MODELS]
    return [
        pytest.param(s, id=s, marks=pytest.mark.skip(reason=EXCLUDE[s])) if s in EXCLUDE else s for s in specs
    ]


def build(spec: str) -> nn.Module:
    """A model with random weights from a `timm:NAME` or `torchvision:NAME` spec."""
    source, name = spec.split(":", 1)
    kwargs = BUILD_KWARGS.get(spec, {})
    torch.manual_seed(0)
    if source == "timm":
        return timm.create_model(name, pretrained=False, **kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def evenly_spaced(n: int, k: int = MAX_CHECKED_CUTS) -> list[int]:
    """Up to k indices of range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def training_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits; train-mode tuples (inception/googlenet) put them first."""
    if isinstance(out, torch.Tensor):
        return F.cross_entropy(out, target)
    logits, *aux = out
    loss = F.cross_entropy(logits, target)
    for a in aux:
        if a is not None:  # reason: torchvision GoogLeNet returns None for disabled aux heads
            loss = loss + AUX_WEIGHT * F.cross_entropy(a, target)
    return loss


@dataclass
class Case:
    """One model of the sweep; the DropGraph is traced once and shared by its tests."""

    spec: str
    model: nn.Module
    x: torch.Tensor  # (B, 3, H, W)
    records: dict  # spec -> ZooRecord, for the summary table

    @functools.cached_property
    def traced(self) -> fxdrop.DropGraph | Exception:
        try:
            dg = fxdrop.trace(self.model, self.x)
        except Exception as exc:  # reason: reported by the test that asks, not at fixture setup
            return exc
        self.records[self.spec].cut_points = len(dg.cut_points)
        return dg

    @property
    def graph(self) -> fxdrop.DropGraph:
        if isinstance(self.traced, Exception):
            pytest.fail(f"{self.spec} did not trace: {type(self.traced).__name__}: {self.traced}")
        return self.traced


@pytest.fixture(scope="module", params=_specs())
def spec(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def case(spec: str, zoo_records: dict) -> Case:
    model = build(spec)
    randomize_bn(model)
    randomize_zero_init(model)
    model.eval()
    size = INPUT_SIZE.get(spec, DEFAULT_SIZE)
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    return Case(spec, model, x, zoo_records)


def test_traces_with_cut_points(case: Case) -> None:
    if isinstance(case.traced, Exception):
        raise case.traced
    dg = case.traced
    assert len(dg.cut_points) >= 1
    # every parameter belongs to exactly one segment
    names = [n for seg in dg.segments for n in seg.param_names]
    assert sorted(names) == sorted(n for n, _ in case.model.named_parameters())


def test_split_is_exact_in_eval(case: Case) -> None:
    dg, model, x = case.graph, case.model, case.x
    model.eval()
    with torch.no_grad():
        ref = model(x)  # (B, num_classes)
    # reason: equality proves nothing if the output is not finite or ignores the input
    assert torch.isfinite(ref).all() and not torch.equal(ref[0], ref[1]), "degenerate reference output"
    for k in evenly_spaced(len(dg.cut_points)):
        cut = dg.cut_points[k]
        prefix, suffix = dg.split(cut)
        suffix.eval()
        with torch.no_grad():
            a = prefix(x)
            a_before = a.clone()
            out = suffix(a)
        if case.spec in LAST_BITS:
            torch.testing.assert_close(
                out, ref, rtol=1e-5, atol=1e-5, msg=f"cut {k} '{cut.name}' ({cut.module})"
            )
        else:
            assert torch.equal(out, ref), (
                f"cut {k} '{cut.name}' ({cut.module}): max |diff| {(out - ref).abs().max()}"
            )
        assert torch.equal(a, a_before), f"cut {k} '{cut.name}': the suffix wrote to its input"


def test_suffix_trains_with_frozen_prefix(case: Case) -> None:
    dg, model, x = case.graph, case.model, case.x
    cut = dg.cut_points[len(dg.cut_points) // 2]
    prefix, suffix = dg.split(cut)
    params = dict(model.named_parameters())
    suffix_names = [n for seg in dg.segments[cut.index + 1 :] for n in seg.param_names]
    prefix_names = [n for seg in dg.segments[: cut.index + 1] for n in seg.param_names]
    prefix_buffers = {n: b.clone() for n, b in model.named_buffers() if _used_by(prefix, n)}

    model.train()
    suffix.train()
    model.zero_grad(set_to_none=True)
    a = prefix(x)
    out = suffix(a)
    target = torch.arange(BATCH) % _num_classes(out)
    training_loss(out, target).backward()

    trainable = [n for n in suffix_names if params[n].requires_grad]
    assert trainable, f"nothing trainable after cut '{cut.name}'"
    missing = [n for n in trainable if params[n].grad is None]
    assert not missing, f"no gradient for {len(missing)} suffix parameters: {missing[:5]}"
    leaked = [n for n in prefix_names if params[n].requires_grad or params[n].grad is not None]
    assert not leaked, f"prefix parameters not frozen: {leaked[:5]}"
    buffers = dict(model.named_buffers())
    moved = [n for n, b in prefix_buffers.items() if not torch.equal(buffers[n], b)]
    assert not moved, f"prefix buffers changed in a training step: {moved[:5]}"


def _used_by(piece, tensor_name: str) -> bool:
    """Whether a graph piece reads this parameter or buffer (directly or through a leaf module)."""
    for node in piece.eval_gm.graph.nodes:
        if node.op == "get_attr" and node.target == tensor_name:
            return True
        if node.op == "call_module" and tensor_name.startswith(node.target + "."):
            return True
    return False


def _num_classes(out) -> int:
    logits = out if isinstance(out, torch.Tensor) else out[0]
    return logits.shape[-1]
