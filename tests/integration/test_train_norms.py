"""Training with --norm brn --acnet: the run resumes its Batch Renormalization warm-up from the checkpoint, and
its checkpoint loads, folds and exports like a plain model's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_runs import tiny_config

from detector.config import resolve_train_config
from detector.engine.trainer import Trainer
from detector.export import export
from detector.models.acnet import ACConv
from detector.models.loading import load_model
from detector.models.norms import BatchRenorm2d
from detector.utils.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def test_brn_acnet_run_resumes_its_warmup_and_its_checkpoint_folds_and_exports(tiny, tmp_path):
    base = tiny_config(tiny, tmp_path, epochs=1, batch_size=4, norm="brn", acnet=True)
    config = dataclasses.replace(base, norm_options=dataclasses.replace(base.norm_options, renorm_warmup=8))
    Trainer(config).fit()
    last = tmp_path / "runs" / "exp" / "weights" / "last.pt"
    first = load_checkpoint(last)
    assert first["model_yaml"]["norm"] == "brn" and first["model_yaml"]["acnet"] is True
    assert first["model_yaml"]["norm_args"]["renorm_warmup"] == 8
    assert int(first["model"]["model.0.bn.num_batches_tracked"]) == 2  # 8 images in batches of 4

    resumed = Trainer(resolve_train_config({"resume": str(last), "epochs": 2}))
    norm = resumed.model.model[0].bn
    assert isinstance(norm, BatchRenorm2d) and [float(b) for b in norm.bounds()] == [1.5, 1.25]  # 2 of 8 batches
    resumed.fit()
    checkpoint = load_checkpoint(last)
    assert int(checkpoint["model"]["model.0.bn.num_batches_tracked"]) == 4
    assert checkpoint["ema"].keys() == checkpoint["model"].keys()

    model, fused = load_model(last), load_model(last, fuse=True)
    assert any(isinstance(m, ACConv) for m in model.modules()) and not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()
    )
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(model.forward_raw(images), fused.forward_raw(images), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    paths = export(str(last), include=("onnx",), imgsz=(64, 64), project=str(tmp_path / "export"))
    assert paths["onnx"].is_file()  # written and checked against the .pt's PyTorch predictions by the exporter
