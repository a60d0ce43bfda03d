"""`fxdrop finetune`'s options: each one's flags, help and panel. Each is named as the library
names the argument it sets (a FitConfig field, or `finetune`'s own), so that the command passes
them on by name and a library message that names one is shown as its flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, Tuple

import typer

MODEL_HELP = "timm:NAME, torchvision:NAME, path/to/file.py:FACTORY, or a bare timm name (resnet18)"
# finetune's help panels, in the order a run needs them
_DATA, _MODEL, _TRAINING, _DROPPING = "Data", "Model", "Training", "Dropping"
_MIXING = "Mixing (timm's flags)"
_CACHE, _OUTPUT = "Cache", "Output"
LIMIT_VAL = "max(N/4, classes)"  # the validation subset --limit takes (fxdrop.data.build_data)
_POLICY_HELP = (
    "learn-drop | autofreeze | freezeout[:T0] (FreezeOut: each segment's rate annealed to zero at "
    "its freeze) | freezeout-schedule[:T0] (its schedule only) | none | fixed:CUT@N (CUT from "
    "`fxdrop inspect`; dropped after N epochs, @0: from the start)"
)

Model = Annotated[
    str,
    typer.Argument(
        help=MODEL_HELP,
    ),
]

Data = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="fashion-mnist, fashion-mnist:0-4 (those classes, relabelled from 0), or a folder with "
        "train/<class>/* and val/<class>/*",
        rich_help_panel=_DATA,
    ),
]

ImgSize = Annotated[
    Optional[int],
    typer.Option(
        help="input size in pixels",
        show_default="auto: 32 for fashion-mnist; for a folder the model's own, or the images' own when "
        "smaller, but not below the model's downsampling",
        rich_help_panel=_DATA,
    ),
]

Limit = Annotated[
    Optional[int],
    typer.Option(
        help=f"use class-balanced subsets: N training images and {LIMIT_VAL} validation images",
        show_default="every image",
        rich_help_panel=_DATA,
    ),
]

NumWorkers = Annotated[
    int,
    typer.Option(
        "--workers",
        "-j",
        help="DataLoader worker processes for image batches",
        rich_help_panel=_DATA,
    ),
]

Pretrained = Annotated[
    Optional[bool],
    typer.Option(
        "--pretrained/--no-pretrained",
        metavar="",
        help="start from the hub's weights",
        show_default="auto: yes for timm: and torchvision: models, no for a file's or with --weights",
        rich_help_panel=_MODEL,
    ),
]

Weights = Annotated[
    Optional[Path],
    typer.Option(
        help="start from a local state dict: .safetensors, or .pth read weights-only (never runs code); "
        "DDP's `module.` prefix is removed",
        rich_help_panel=_MODEL,
    ),
]

Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        metavar="",
        help="torch.compile (inductor) the trainable model, again after each drop",
        rich_help_panel=_MODEL,
    ),
]

Epochs = Annotated[
    int,
    typer.Option(
        "--epochs",
        "-e",
        help="passes over the training data",
        rich_help_panel=_TRAINING,
    ),
]

BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size",
        "-b",
        help="global batch size",
        rich_help_panel=_TRAINING,
    ),
]

Lr = Annotated[
    Optional[float],
    typer.Option(
        help="peak learning rate",
        show_default="auto: 0.1 x batch / 256 with sgd, so 0.025 at batch 64; 1e-3 with adamw",
        rich_help_panel=_TRAINING,
    ),
]

Optimizer = Annotated[
    str,
    typer.Option(
        "--optimizer",
        "--opt",
        help="sgd or adamw",
        rich_help_panel=_TRAINING,
    ),
]

Momentum = Annotated[
    float,
    typer.Option(
        help="SGD momentum",
        rich_help_panel=_TRAINING,
    ),
]

WeightDecay = Annotated[
    float,
    typer.Option(
        "--weight-decay",
        "--wd",
        help="weight decay",
        rich_help_panel=_TRAINING,
    ),
]

WarmupEpochs = Annotated[
    float,
    typer.Option(
        help="linear learning-rate warm-up before the cosine decay",
        rich_help_panel=_TRAINING,
    ),
]

LabelSmoothing = Annotated[
    float,
    typer.Option(
        "--smoothing",
        help="label smoothing of the cross-entropy",
        rich_help_panel=_TRAINING,
    ),
]

Amp = Annotated[
    Optional[bool],
    typer.Option(
        "--amp/--no-amp",
        metavar="",
        help="bf16 autocast",
        show_default="auto: on with CUDA, off on the CPU",
        rich_help_panel=_TRAINING,
    ),
]

Device = Annotated[
    Optional[str],
    typer.Option(
        help="cpu, cuda, cuda:1",
        show_default="auto: cuda if available, else cpu",
        rich_help_panel=_TRAINING,
    ),
]

Seed = Annotated[
    int,
    typer.Option(
        help="seeds the model's initialisation, data order, augmentation and dropout",
        rich_help_panel=_TRAINING,
    ),
]

ClipGrad = Annotated[
    Optional[float],
    typer.Option(
        help="clip the trainable parameters' gradients to this before each optimizer step",
        show_default="no clipping",
        rich_help_panel=_TRAINING,
    ),
]

ClipMode = Annotated[
    str,
    typer.Option(
        help="how --clip-grad clips: norm | value | agc",
        rich_help_panel=_TRAINING,
    ),
]

GradAccumSteps = Annotated[
    int,
    typer.Option(
        help="batches per optimizer step (the schedule counts optimizer steps; default --lr scales "
        "with batch x N)",
        rich_help_panel=_TRAINING,
    ),
]

ModelEma = Annotated[
    bool,
    typer.Option(
        "--model-ema",
        metavar="",
        help="keep an EMA of the weights (OUT/model-ema.safetensors; a dropped prefix's is its weights)",
        rich_help_panel=_TRAINING,
    ),
]

ModelEmaDecay = Annotated[
    float,
    typer.Option(
        help="the EMA's decay per optimizer step",
        rich_help_panel=_TRAINING,
    ),
]

ModelEmaEval = Annotated[
    bool,
    typer.Option(
        "--model-ema-eval",
        metavar="",
        help="validate, and choose OUT/model-best.safetensors, with the EMA's weights",
        rich_help_panel=_TRAINING,
    ),
]

Mixup = Annotated[
    float,
    typer.Option(
        help="mixup alpha; mixing trains on soft targets (0: off)",
        rich_help_panel=_MIXING,
    ),
]

Cutmix = Annotated[
    float,
    typer.Option(
        help="CutMix alpha (0: off)",
        rich_help_panel=_MIXING,
    ),
]

CutmixMinmax = Annotated[
    Optional[Tuple[float, float]],
    typer.Option(
        help="CutMix box sides as fractions of the image, MIN MAX (instead of --cutmix's alpha)",
        show_default="off",
        rich_help_panel=_MIXING,
    ),
]

MixupProb = Annotated[
    float,
    typer.Option(
        help="probability of mixing a batch (or sample)",
        rich_help_panel=_MIXING,
    ),
]

MixupSwitchProb = Annotated[
    float,
    typer.Option(
        help="probability of CutMix when both are on",
        rich_help_panel=_MIXING,
    ),
]

MixupMode = Annotated[
    str,
    typer.Option(
        help="what shares one draw: batch | pair | elem",
        rich_help_panel=_MIXING,
    ),
]

MixAfterDrop = Annotated[
    str,
    typer.Option(
        help="after a drop (images gone): activations (mix the cut's activations; CutMix a box on "
        "the feature map) | stop",
        rich_help_panel=_MIXING,
    ),
]

Patience = Annotated[
    Optional[int],
    typer.Option(
        help="stop after N validated epochs without a better validation accuracy "
        "(the best epoch's weights: OUT/model-best.safetensors)",
        show_default="never stop early",
        rich_help_panel=_TRAINING,
    ),
]

Policy = Annotated[
    str,
    typer.Option(
        "--policy",
        "-p",
        help=_POLICY_HELP,
        rich_help_panel=_DROPPING,
    ),
]

Landing = Annotated[
    float,
    typer.Option(
        help="epochs over which a segment's learning rate anneals to zero before it freezes (0: at once)",
        rich_help_panel=_DROPPING,
    ),
]

CacheDir = Annotated[
    Optional[Path],
    typer.Option(
        help="activation cache folder",
        show_default="OUT/cache",
        rich_help_panel=_CACHE,
    ),
]

CacheDtype = Annotated[
    str,
    typer.Option(
        help="how activations are stored: auto | fp32 | bf16 | fp16 | int8 | fp8 "
        "(auto: the most exact that fits the fastest memory)",
        rich_help_panel=_CACHE,
    ),
]

CacheMemory = Annotated[
    Optional[str],
    typer.Option(
        help="memory the cache may take, e.g. 2GiB, 500MB",
        show_default="half of what is free",
        rich_help_panel=_CACHE,
    ),
]

CacheViews = Annotated[
    int,
    typer.Option(
        help="augmented views cached per sample, rotated by epoch (1 = the paper)",
        rich_help_panel=_CACHE,
    ),
]

KeepCache = Annotated[
    bool,
    typer.Option(
        metavar="",
        help="keep the activation cache after the run (reused by a rerun and `fxdrop update`)",
        rich_help_panel=_CACHE,
    ),
]

Out = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="output folder: model.safetensors, metrics.json, config.json, checkpoint",
        rich_help_panel=_OUTPUT,
    ),
]

Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        metavar="",
        help="continue the run in --out from its last finished epoch",
        rich_help_panel=_OUTPUT,
    ),
]

Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        metavar="",
        help="replace the run in --out",
        rich_help_panel=_OUTPUT,
    ),
]

LogTensorboard = Annotated[
    bool,
    typer.Option(
        "--log-tensorboard",
        metavar="",
        help="TensorBoard event files in OUT/tensorboard (pip install tensorboard)",
        rich_help_panel=_OUTPUT,
    ),
]
