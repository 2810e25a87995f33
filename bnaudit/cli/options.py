"""The options of `check` and `config`, each declared once as a typer `Annotated` alias.

A command takes one as `key: Key = None`. show, recalibrate, fold and diff take the shorter ones
of `cli.command_options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.gate.config import Regime, TrainMode
from bnaudit.inputs.precision import Autocast
from bnaudit.report.github import GitHub
from bnaudit.report.render import Format
from bnaudit.verdict.results import FailOn

INPUTS = "Inputs"
OUTPUT_IMPACT = "Output impact"
REPORTS = "Reports"
GATE = "Gate"
THRESHOLDS = "Thresholds"

# The checkpoint: `check` audits it, `config` may go without.
AuditedCheckpoint = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint, or ONNX model, to audit (only read, never changed).",
        show_default=False,
    ),
]
OptionalCheckpoint = Annotated[
    Path | None, typer.Argument(help="Checkpoint (optional).", show_default=False)
]

# Inputs: what `check` and `config` take.
Against = Annotated[
    Path | None,
    typer.Option(
        "--against",
        rich_help_panel=INPUTS,
        help="The checkpoint the audited artifact (ONNX, TorchScript, .pt2) was exported from: "
        "run both on --data with --model, and find and judge every BN layer in the artifact "
        "(ONNX needs pip install 'bnaudit[onnx]').",
    ),
]
Key = Annotated[
    str | None,
    typer.Option(
        "--key",
        "-k",
        rich_help_panel=INPUTS,
        help="Which state dict of a checkpoint dict to audit, e.g. state_dict_ema (nested: "
        "ema.module; in a flat state dict: a key prefix) [default: the first of state_dict, "
        "model_state_dict, model, module, net, network, then the EMA keys].",
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        rich_help_panel=INPUTS,
        help="Architecture: timm:NAME, torchvision:NAME (built without pretrained weights: "
        "the checkpoint has them), path/to/file.py:factory or package.module:factory.",
    ),
]
ModelArg = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        metavar="NAME=VALUE",
        rich_help_panel=INPUTS,
        help="Keyword argument of the --model factory, VALUE a Python literal "
        "(repeatable), e.g. --model-arg num_classes=10.",
    ),
]
Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        rich_help_panel=INPUTS,
        help="Sample batches: a folder of images (decoded by Pillow: pip install pillow), "
        ".pt/.pth, .npy, .npz, or path/to/file.py:function / module:function returning batches "
        "(a DataLoader, say).",
    ),
]
ImageSize = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Images: center crop size (default: timm's data config, else 224).",
    ),
]
Mean = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Images: per-channel mean, e.g. 0.5,0.5,0.5 (default: timm's data config, else "
        "ImageNet's 0.485,0.456,0.406).",
    ),
]
Std = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Images: per-channel std (default: timm's data config, else ImageNet's "
        "0.229,0.224,0.225).",
    ),
]
Input = Annotated[
    str | None,
    typer.Option(
        "--input",
        rich_help_panel=INPUTS,
        help="Which part of a batch is the model's input: an element index (0 for "
        "(images, labels)), a dict key, or '*' for every element [default: model(*batch) "
        "when the forward requires every element, else batch[0]; dicts: model(**batch)].",
    ),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Synthetic N(0,1) batches of this shape, e.g. "
        "8x3x224x224; data-dependent verdicts are not drawn.",
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Split a single data tensor into batches of this size "
        "[default: 32]; use the training batch size where known.",
    ),
]
_COUNTERS = "a training checkpoint's BN counters are compared with"
StepsPerEpoch = Annotated[
    int | None,
    typer.Option(rich_help_panel=INPUTS, help=f"Steps per epoch: {_COUNTERS} its epoch x this."),
]
Accumulate = Annotated[
    int | None,
    typer.Option(rich_help_panel=INPUTS, help=f"Micro-batches per step: {_COUNTERS} steps x this."),
]
Batches = Annotated[
    int | None,
    typer.Option(rich_help_panel=INPUTS, help="Use at most this many batches [default: all]."),
]
Device = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Device: cpu, cuda, cuda:1, ... (under torchrun, cuda is cuda:LOCAL_RANK) "
        "[default: cpu].",
    ),
]
AutocastDtype = Annotated[
    Autocast | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Run the forward under torch.autocast in this dtype, as deployed [default: off].",
    ),
]
Seed = Annotated[int | None, typer.Option(rich_help_panel=INPUTS, help="Random seed [default: 0].")]
TrainModePass = Annotated[
    TrainMode | None,
    typer.Option(
        rich_help_panel=INPUTS,
        help="Train-mode pass: only BN layers (bn) or the whole model (all) [default: bn].",
    ),
]
Trust = Annotated[
    bool,
    typer.Option(
        "--trust",
        rich_help_panel=INPUTS,
        help="Allow pickled objects (a whole nn.Module), TorchScript and torch.export files: "
        "this RUNS CODE from the file.",
    ),
]

# Output impact: how recalibrated statistics change the output.
Metric = Annotated[
    str | None,
    typer.Option(
        "--metric",
        rich_help_panel=OUTPUT_IMPACT,
        help="Task metric for labelled batches: file.py:fn or module:fn, fn(outputs, labels) -> "
        "float, higher is better [default: top-1 accuracy for [B, K] outputs].",
    ),
]
Impact = Annotated[
    bool | None,
    typer.Option(
        "--impact/--no-impact",
        rich_help_panel=OUTPUT_IMPACT,
        help="Measure how recalibrated statistics change the eval output [default: on].",
    ),
]
ImpactRegime = Annotated[
    Regime | None,
    typer.Option(
        rich_help_panel=OUTPUT_IMPACT,
        help="Recalibrate from train-mode inputs, or eval-mode inputs layer after layer "
        "[default: train].",
    ),
]
Attribution = Annotated[
    bool | None,
    typer.Option(
        "--attribution/--no-attribution",
        rich_help_panel=OUTPUT_IMPACT,
        help="Also recalibrate each flagged layer alone (8 at most, a pass per batch each) "
        "[default: off].",
    ),
]

# Reports.
Hash = Annotated[
    bool | None,
    typer.Option(
        "--hash/--no-hash",
        rich_help_panel=REPORTS,
        help="Compute the checkpoint's SHA-256 for the reports [default: when a report file, "
        "--format other than table, --model or GitHub Actions needs it].",
    ),
]
StdoutFormat = Annotated[
    Format | None,
    typer.Option(
        "--format", "-f", rich_help_panel=REPORTS, help="What goes to stdout [default: table]."
    ),
]
Markdown = Annotated[
    Path | None, typer.Option(rich_help_panel=REPORTS, help="Write a markdown report.")
]
Csv = Annotated[
    Path | None,
    typer.Option(rich_help_panel=REPORTS, help="Write a CSV report (a row per layer)."),
]
Json = Annotated[
    Path | None, typer.Option("--json", rich_help_panel=REPORTS, help="Write a JSON report.")
]
Html = Annotated[
    Path | None,
    typer.Option(
        rich_help_panel=REPORTS,
        help="Write a self-contained HTML report (charts, sortable table).",
    ),
]
Junit = Annotated[
    Path | None,
    typer.Option(rich_help_panel=REPORTS, help="Write JUnit XML: a test case per layer."),
]
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", rich_help_panel=REPORTS, help="Print only the verdict line."),
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        rich_help_panel=REPORTS,
        help="List every finding with its message, not one line per code.",
    ),
]
Wide = Annotated[
    bool,
    typer.Option(
        "--wide",
        rich_help_panel=REPORTS,
        help="Show every column, names in full [default: fit the terminal, COLUMNS or 80].",
    ),
]

# Gate: what fails the run.
FailOnSeverity = Annotated[
    FailOn | None,
    typer.Option(
        rich_help_panel=GATE,
        help="Exit 1 on findings of this severity or worse [default: fail].",
    ),
]
Baseline = Annotated[
    Path | None,
    typer.Option(
        rich_help_panel=GATE,
        help="Fail only on findings that are new or worse than in this baseline file.",
    ),
]
WriteBaseline = Annotated[
    Path | None,
    typer.Option(
        rich_help_panel=GATE,
        help="Record the current findings in this baseline file (and pass on them).",
    ),
]
BaselineMargin = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=GATE,
        help="A baselined finding is worse when its value grows by more than this fraction "
        "[default: 0.1].",
    ),
]
GitHubActions = Annotated[
    GitHub | None,
    typer.Option(
        rich_help_panel=GATE,
        help="GitHub Actions annotations and step summary [default: auto, on when "
        "GITHUB_ACTIONS=true].",
    ),
]
MaxAnnotations = Annotated[
    int | None,
    typer.Option(rich_help_panel=GATE, help="At most this many annotations [default: 10]."),
]

# Thresholds: one per verdict threshold.
MaxOutputChange = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=THRESHOLDS,
        help="Fail when recalibration changes the output by more (relative L2) [default: off].",
    ),
]
MaxErrorRatio = Annotated[
    float | None,
    typer.Option(rich_help_panel=THRESHOLDS, help="Reconstruction error / tolerance [default: 1]."),
]
StaleShift = Annotated[
    float | None,
    typer.Option(rich_help_panel=THRESHOLDS, help="Mean shift in running sds [default: 0.3]."),
]
StaleLogVar = Annotated[
    float | None,
    typer.Option(rich_help_panel=THRESHOLDS, help="|ln variance ratio| [default: 0.4]."),
]
StaleZ = Annotated[
    float | None,
    typer.Option(rich_help_panel=THRESHOLDS, help="Sds of sample noise + EMA jitter [default: 4]."),
]
StaleFraction = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=THRESHOLDS,
        help="Fraction of channels (and at least 2) for a layer verdict [default: 0.1].",
    ),
]
StaleAlpha = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=THRESHOLDS,
        help="And a count of off channels noise alone reaches less often [default: 0.001].",
    ),
]
MinBatch = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=THRESHOLDS, help="Smallest batch for a stale verdict [default: 3]."
    ),
]
VarBiasScale = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=THRESHOLDS, help="1 - sqrt((N-1)/N) above this warns [default: 0.02]."
    ),
]
MaxAmplification = Annotated[
    float | None,
    typer.Option(rich_help_panel=THRESHOLDS, help="|gamma|/sqrt(var+eps) [default: 1000]."),
]
MaxInitWeight = Annotated[
    float | None,
    typer.Option(rich_help_panel=THRESHOLDS, help="(1-m)^T of the initial values [default: 0.05]."),
]
KerasMomentum = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=THRESHOLDS,
        help="Momentum at or above this is likely a Keras value [default: 0.5].",
    ),
]

# Every command: `check` and `config` say more about --config.
Config = Annotated[
    Path | None,
    typer.Option(
        help="TOML file with a [tool.bnaudit] table [default: pyproject.toml from here upward].",
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
