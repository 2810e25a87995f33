"""BN variants met in real checkpoints, and the diagnosis of outputs that miss the formula.

Local modules stand in for the third-party ones (timm, torchvision, a graph library).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.nn.functional as F
from torch import Tensor, nn

from bnaudit import Severity, audit
from bnaudit.core.errors import ModelError
from bnaudit.demo import calibrate, make_images
from tests import nets


def images(batch: int = 32, count: int = 4, seed: int = 11) -> list[Tensor]:
    return list(torch.split(make_images(batch * count, seed=seed), batch))


def calibrated(model: nn.Module, seed: int = 1, batches: int = 150) -> nn.Module:
    calibrate(model, make_images(32 * batches, seed=seed), 32)
    return model.eval()


def worst(report, name: str) -> Severity:
    return report.layer(name).severity


def codes_on(report, name: str) -> set[str]:
    return {f.code for f in report.layer(name).findings}


def assert_healthy(report) -> None:
    """No warn or fail anywhere, and every layer reproduced within tolerance."""
    assert [f for f in report.findings if f.severity >= Severity.WARN] == []
    for r in report.layers:
        assert r.metrics.seen.calls > 0, r.name
        assert r.metrics.train.recon.ratio < 1 and r.metrics.eval.recon.ratio < 1, r.name


class ConvNet(nn.Module):
    """conv → norm → relu → conv → norm, with the norm class chosen by the test."""

    def __init__(self, norm: type[nn.Module], **kw) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = norm(8, **kw)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = norm(8, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def stale_first(model: ConvNet) -> ConvNet:
    """Rescale conv1's output channels: only norm1's running stats go stale."""
    with torch.no_grad():
        scale = torch.linspace(1.6, 2.6, 8)
        model.conv1.weight.mul_(scale.reshape(-1, 1, 1, 1))
        model.conv1.bias.mul_(scale)
    return model


# --- torch's own variants --------------------------------------------------------------------


def test_sync_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    model = calibrated(nn.SyncBatchNorm.convert_sync_batchnorm(ConvNet(nn.BatchNorm2d)))
    assert isinstance(model.norm1, nn.SyncBatchNorm)
    assert_healthy(audit(model, images()))
    report = audit(stale_first(model), images())
    assert "stale-stats" in codes_on(report, "norm1")
    assert worst(report, "norm2") < Severity.WARN


def test_lazy_batchnorm_after_materialisation() -> None:
    torch.manual_seed(0)
    model = ConvNet(lambda c: nn.LazyBatchNorm2d())
    with pytest.raises(ModelError, match="not materialised"):
        audit(model, images())
    model(images()[0])  # materialises
    assert_healthy(audit(calibrated(model), images()))
    model.norm2.reset_running_stats()
    broken = audit(model, images())
    assert codes_on(broken, "norm2") >= {"init-stats"} and worst(broken, "norm1") < Severity.WARN


def test_instance_norm_with_running_stats() -> None:
    torch.manual_seed(0)
    model = calibrated(ConvNet(nn.InstanceNorm2d, track_running_stats=True, affine=True))
    report = audit(model, images())
    assert_healthy(report)
    assert {r.metrics.attrs.kind for r in report.layers} == {"instance"}
    assert all(r.metrics.update.mean_ratio < 1 for r in report.layers)
    assert report.layer("norm1").metrics.seen.values_per_channel == 32 * 32  # per sample
    stale = audit(stale_first(model), images())
    assert codes_on(stale, "norm1") >= {"stale-stats"}
    assert worst(stale, "norm2") < Severity.WARN


def test_instance_norm_without_running_stats_is_not_audited() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.BatchNorm2d(4))
    report = audit(model, images(count=2))
    assert [r.name for r in report.layers] == ["2"]


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision's: buffers only, the eval formula in every mode, no counter."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def frozen_from(bn_model: ConvNet) -> ConvNet:
    model = ConvNet(FrozenBatchNorm2d)
    state = {k: v for k, v in bn_model.state_dict().items() if "num_batches" not in k}
    model.load_state_dict(state)
    return model.eval()


def test_frozen_batchnorm_found_by_its_buffers() -> None:
    torch.manual_seed(0)
    model = frozen_from(calibrated(ConvNet(nn.BatchNorm2d)))
    report = audit(model, images())
    assert [r.metrics.attrs.kind for r in report.layers] == ["frozen", "frozen"]
    assert_healthy(report)
    assert report.layer("norm1").metrics.train.drift.judged == "n/a: frozen statistics"
    model.norm2.running_var[1] = -1.0
    broken = audit(model, images())
    assert codes_on(broken, "norm2") >= {"bad-var"} and worst(broken, "norm2") == Severity.FAIL
    assert worst(broken, "norm1") < Severity.WARN


def test_frozen_batchnorm_that_forgets_eps_is_diagnosed() -> None:
    class NoEps(FrozenBatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            scale = self.weight * self.running_var.rsqrt()
            return (x - self.running_mean.reshape(1, -1, 1, 1)) * scale.reshape(
                1, -1, 1, 1
            ) + self.bias.reshape(1, -1, 1, 1)

    torch.manual_seed(0)
    source = calibrated(ConvNet(nn.BatchNorm2d))
    with torch.no_grad():
        source.norm2.running_var.mul_(1e-4)  # small variance: a missing eps shows
    model = ConvNet(NoEps)
    model.load_state_dict({k: v for k, v in source.state_dict().items() if "num_b" not in k})
    report = audit(model.eval(), images())
    assert codes_on(report, "norm2") >= {"recon-eval"}
    assert report.layer("norm2").metrics.eval.recon.explanation_key == "eps"
    assert "eps = " in next(f.message for f in report.findings if f.code == "recon-eval")


@pytest.mark.parametrize("fused", ["intrinsic", "qat", "qat-relu"])
def test_bn_inside_fused_conv_bn_modules(fused: str) -> None:
    torch.manual_seed(0)
    qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    if fused == "intrinsic":
        block = nni.ConvBn2d(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    elif fused == "qat":
        block = nniqat.ConvBn2d(3, 8, 3, padding=1, qconfig=qconfig)
    else:
        block = nniqat.ConvBnReLU2d(3, 8, 3, padding=1, qconfig=qconfig)
    model = calibrated(nn.Sequential(block, nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)), batches=60)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = audit(model, images())
    names = [r.name for r in report.layers]
    assert names == ["0.1" if fused == "intrinsic" else "0.bn", "2"]
    assert_healthy(report)
    after = model.state_dict()  # observers and fake-quant state are restored too
    assert all(torch.equal(before[k], after[k]) for k in before)
    inner = names[0]
    model.get_submodule(inner).running_var[0] = float("inf")
    broken = audit(model, images())
    assert {f.layer for f in broken.findings if f.code == "nonfinite"} == {inner}


def test_wrapped_bn_is_audited_once() -> None:
    class GraphBatchNorm(nn.Module):  # e.g. torch_geometric.nn.BatchNorm
        def __init__(self, c: int) -> None:
            super().__init__()
            self.module = nn.BatchNorm1d(c)

        def forward(self, x: Tensor) -> Tensor:
            return self.module(x)

    model = nn.Sequential(nn.Linear(20, 16), GraphBatchNorm(16), nn.ReLU(), nn.Linear(16, 2))
    calibrate(model, nets.mlp_data(32 * 100, seed=1), 32)
    report = audit(model.eval(), list(torch.split(nets.mlp_data(32 * 4, seed=2), 32)))
    assert [r.name for r in report.layers] == ["1.module"]
    assert_healthy(report)
    model[1].module.momentum = 0.99
    assert "momentum-convention" in codes_on(
        audit(model, [nets.mlp_data(32, seed=3)] * 2), "1.module"
    )


# --- subclasses that add work after the normalisation ----------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: BN, then dropout (identity unless asked for), then an activation."""

    def __init__(self, c: int, act: nn.Module | None = None) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


@pytest.mark.parametrize(
    ("act", "name"), [(nn.ReLU(), "relu"), (nn.SiLU(), "silu"), (nn.GELU(), "gelu")]
)
def test_bn_act_is_a_variant_not_a_failure(act: nn.Module, name: str) -> None:
    torch.manual_seed(0)
    model = calibrated(ConvNet(lambda c: BatchNormAct2d(c, copy.deepcopy(act))), batches=60)
    report = audit(model, images())
    assert [f for f in report.findings if f.severity >= Severity.WARN] == []
    for layer in ("norm1", "norm2"):
        found = report.layer(layer).findings
        assert [(f.code, f.severity) for f in found] == [("nonstandard-forward", Severity.INFO)]
        assert "plain BN before what it adds (measured at the input of drop)" in found[0].message
        assert "BatchNormAct2d" in found[0].message
        m = report.layer(layer).metrics
        # Read where the normalisation happens: nothing to explain.
        assert m.seen.measured_at == "input of drop"
        assert m.train.recon.ratio < 1 and m.eval.recon.ratio < 1
        assert m.train.recon.explanation_key == "" == m.eval.recon.explanation_key
    stale = audit(stale_first(model), images())
    assert "stale-stats" in codes_on(stale, "norm1")


def test_unexplained_nonstandard_forward_names_the_class() -> None:
    class Doubled(nn.BatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            return 2.5 * super().forward(x) + 0.1

    torch.manual_seed(0)
    model = calibrated(ConvNet(Doubled), batches=30)
    report = audit(model, images(count=2))
    for layer in ("norm1", "norm2"):
        found = {f.code: f for f in report.layer(layer).findings}
        assert {"recon-train", "recon-eval", "nonstandard-forward"} <= set(found)
        assert found["nonstandard-forward"].severity == Severity.WARN
        assert "Doubled" in found["nonstandard-forward"].message
        assert "no known mistake explains it" in found["recon-train"].message


# --- each classic mistake, planted and named -------------------------------------------------


class Planted(nn.BatchNorm2d):
    """A BN layer computing one specific wrong formula, chosen by `mistake`."""

    def __init__(self, c: int, mistake: str) -> None:
        super().__init__(c)
        self.mistake = mistake

    def forward(self, x: Tensor) -> Tensor:
        m, w, b, eps = self.mistake, self.weight, self.bias, self.eps
        view = (1, -1, 1, 1)
        if self.training:
            super().forward(x)  # keeps torch's running-stat update
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        else:
            mean, var = self.running_mean, self.running_var
        if m == "unbiased" and self.training:
            var = var * x[:, 0].numel() / (x[:, 0].numel() - 1)
        if m == "running-in-train" and self.training:
            mean, var = self.saved_mean, self.saved_var
        if m == "batch-in-eval" and not self.training:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        if m == "channels-last":  # statistics per W (== C) as if the tensor were NHWC
            dims = (0, 1, 2)
            var_l, mean_l = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
            return (x - mean_l) * (var_l + eps).rsqrt() * w.reshape(1, 1, 1, -1) + b.reshape(
                1, 1, 1, -1
            )
        if m == "bfloat16":
            out = F.batch_norm(
                x.bfloat16(),
                mean.bfloat16(),
                var.bfloat16(),
                w.bfloat16(),
                b.bfloat16(),
                False,
                0.0,
                eps,
            )
            return out.float()
        if m == "eps-outside":
            normed = (x - mean.reshape(view)) / (var.sqrt().reshape(view) + eps)
        elif m == "eps":
            normed = (x - mean.reshape(view)) * (var.reshape(view) + 1e-2).rsqrt()
        else:
            normed = (x - mean.reshape(view)) * (var.reshape(view) + eps).rsqrt()
        if m == "no-affine":
            return normed
        return normed * w.reshape(view) + b.reshape(view)


MISTAKES = {  # planted mistake → (the regime it shows in, the explanation key expected)
    "unbiased": ("train", "unbiased"),
    "running-in-train": ("train", "running-in-train"),
    "batch-in-eval": ("eval", "batch-in-eval"),
    "eps-outside": ("eval", "eps-outside"),
    "eps": ("eval", "eps"),
    "no-affine": ("eval", "no-affine"),
    "channels-last": ("train", "channels-last"),
    "bfloat16": ("eval", "bfloat16"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_mistake_is_diagnosed(mistake: str) -> None:
    torch.manual_seed(0)
    layer = Planted(8, mistake)
    with torch.no_grad():  # non-trivial attributes, so every mistake changes the output
        layer.weight.copy_(torch.linspace(0.5, 2.0, 8))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, 8))
        layer.running_mean.copy_(torch.linspace(-0.3, 0.3, 8))
        layer.running_var.copy_(torch.linspace(0.002, 0.02, 8))  # small: a wrong eps shows
    layer.saved_mean, layer.saved_var = layer.running_mean.clone(), layer.running_var.clone()
    layer.mistake = "none"
    model = nn.Sequential(layer).eval()
    x = [0.1 * torch.randn(16, 8, 6, 8) for _ in range(3)]  # W = C: channels-last possible
    # The correct formula passes (the stats are arbitrary: stale, but reproduced exactly).
    assert not codes_on(audit(model, x), "0") & {"recon-train", "recon-eval", "running-update"}
    layer.mistake = mistake
    report = audit(model, x)
    regime, key = MISTAKES[mistake]
    code = f"recon-{regime}"
    m = report.layer("0").metrics
    recon = (m.train if regime == "train" else m.eval).recon
    assert code in codes_on(report, "0")
    assert recon.explanation_key == key
    assert recon.explanation_ratio <= 1
    message = next(f.message for f in report.findings if f.code == code)
    assert "it matches" in message and recon.explanation in message


class InlineSiLU(nn.BatchNorm2d):
    """An activation applied inside the forward, not by a child module: only its output can
    be read, so the activation must be diagnosed."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(super().forward(x))


def test_inline_activation_is_diagnosed() -> None:
    torch.manual_seed(0)
    report = audit(calibrated(ConvNet(InlineSiLU), batches=30), images(count=2))
    m = report.layer("norm1").metrics
    assert m.seen.measured_at == "" and m.train.recon.explanation_key == "act:silu"
    (found,) = report.layer("norm1").findings
    assert found.code == "nonstandard-forward" and "BN followed by silu" in found.message


def test_bn_act_diagnosis_settles_after_the_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once one hypothesis alone explains a layer, later batches test only it: same report as
    the full diagnosis on every batch, at a fraction of the hypotheses evaluated."""
    from bnaudit.measure import explain
    from tests.test_fast_paths import assert_same_report

    torch.manual_seed(0)
    model = calibrated(ConvNet(InlineSiLU), batches=30)
    evaluated = [0]
    errors = explain._errors

    def counting(*args):
        evaluated[0] += 1
        return errors(*args)

    monkeypatch.setattr(explain, "_errors", counting)
    settled = audit(model, images(count=4))
    settled_count, evaluated[0] = evaluated[0], 0
    add = explain.Diagnosis.add

    def full(self, case):
        self.settled = None
        add(self, case)

    monkeypatch.setattr(explain.Diagnosis, "add", full)
    everything = audit(model, images(count=4))
    assert_same_report(settled, everything)
    assert settled.layer("norm1").metrics.train.recon.explanation_key == "act:silu"
    # 2 layers × 2 regimes: a full diagnosis on the first batch, then one hypothesis a batch
    # (about 20 hypotheses make a full diagnosis)
    assert 2 * 2 * 3 < settled_count < evaluated[0] / 3
