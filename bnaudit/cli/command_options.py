"""The options of show, recalibrate, fold and diff, each declared once as an `Annotated` alias.

Their help is shorter than `check`'s (`cli.options`) and points back to it where the option means
the same; an option of one command alone is named after what it is for there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnaudit.gate.config import Regime
from bnaudit.inputs.precision import Autocast
from bnaudit.report.render import Format
from bnaudit.verdict.results import FailOn

# Shared by show, recalibrate and fold (diff: config and debug).
Checkpoint = Annotated[Path, typer.Argument(help="Checkpoint (only read).", show_default=False)]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Architecture, as for check.")]
ModelArg = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        metavar="NAME=VALUE",
        help="Argument of the --model factory, as for check (repeatable).",
    ),
]
Input = Annotated[
    str | None, typer.Option("--input", help="Input element or key of a batch, as for check.")
]
BatchSize = Annotated[
    int | None, typer.Option(help="Split a data tensor into batches of this size.")
]
Batches = Annotated[int | None, typer.Option(help="Use at most this many batches.")]
Key = Annotated[str | None, typer.Option(help="Which state dict of the checkpoint, as for check.")]
Device = Annotated[str | None, typer.Option(help="Device [default: cpu].")]
Seed = Annotated[int | None, typer.Option(help="Random seed [default: 0].")]
Config = Annotated[Path | None, typer.Option(help="TOML file with a [tool.bnaudit] table.")]

# show
Layer = Annotated[str, typer.Option("--layer", "-l", help="Qualified name, e.g. layer1.0.bn1.")]
ShowData = Annotated[
    str | None, typer.Option("--data", "-d", help="Sample batches: measure the errors.")
]
ShowInputShape = Annotated[str | None, typer.Option(help="Synthetic batches of this shape.")]
ShowTrust = Annotated[bool, typer.Option("--trust", help="Allow a pickled nn.Module (runs code).")]

# recalibrate
RecalibratedOutput = Annotated[
    Path, typer.Option("--output", "-o", help="Where to write the new checkpoint.")
]
RecalibrationData = Annotated[
    str | None, typer.Option("--data", "-d", help="Sample batches to recalibrate on.")
]
RecalibrationMetric = Annotated[
    str | None,
    typer.Option(
        "--metric", help="Task metric for labelled batches, as for check [default: top-1]."
    ),
]
RecalibrationRegime = Annotated[
    Regime | None,
    typer.Option(help="Statistics of train-mode inputs, or of eval-mode inputs [default: train]."),
]
Layers = Annotated[
    list[str] | None,
    typer.Option(
        "--layers",
        metavar="GLOB",
        help="Only layers matching this glob (repeatable) [default: all].",
    ),
]
RecalibrationAutocast = Annotated[
    Autocast | None,
    typer.Option(help="Run the forward under torch.autocast, as for check [default: off]."),
]
RecalibrationForce = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace an existing output file, and write even when the labelled batches show "
        "that recalibration lowers the task metric.",
    ),
]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Audit before and after (and refuse when labelled batches show a lower task "
        "metric); --no-verify: the statistics pass alone, the cost of update_bn.",
    ),
]

# fold
FoldedOutput = Annotated[
    Path, typer.Option("--output", "-o", help="Where to write the folded model.")
]
FoldData = Annotated[
    str | None, typer.Option("--data", "-d", help="Batches to check the folded model on.")
]
FoldInputShape = Annotated[
    str | None, typer.Option(help="Synthetic batches of this shape instead.")
]
FoldForce = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]

# diff
Base = Annotated[Path, typer.Argument(help="Checkpoint before (only read).", show_default=False)]
New = Annotated[Path, typer.Argument(help="Checkpoint after (only read).", show_default=False)]
BaseKey = Annotated[
    str | None, typer.Option("--key", "-k", help="Which state dict of BASE, as for check.")
]
NewKey = Annotated[
    str | None,
    typer.Option("--key-new", help="Which state dict of NEW (default: the --key of BASE)."),
]
DiffModel = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Architecture, as for check: upstream from its dataflow."),
]
DiffTrust = Annotated[
    bool,
    typer.Option("--trust", help="Allow pickled objects, TorchScript, torch.export (runs code)."),
]
DiffFormat = Annotated[
    Format | None,
    typer.Option("--format", "-f", help="What goes to stdout (default: table)."),
]
DiffMarkdown = Annotated[Path | None, typer.Option(help="Write a markdown report.")]
DiffCsv = Annotated[Path | None, typer.Option(help="Write a CSV report (a row per layer).")]
DiffJson = Annotated[Path | None, typer.Option("--json", help="Write a JSON report.")]
DiffHtml = Annotated[Path | None, typer.Option(help="Write a self-contained HTML report.")]
DiffQuiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")]
OnlyChanged = Annotated[
    bool,
    typer.Option("--only-changed", help="Leave out layers where nothing changed or was found."),
]
DiffFailOn = Annotated[
    FailOn | None, typer.Option(help="Exit 1 on findings of this severity (default: fail).")
]
DiffBaseline = Annotated[
    Path | None, typer.Option(help="Fail only on findings new or worse than this.")
]
DiffWriteBaseline = Annotated[
    Path | None, typer.Option(help="Record the findings in this baseline.")
]
DiffBaselineMargin = Annotated[
    float | None, typer.Option(help="Baseline value margin (default: 0.1).")
]
