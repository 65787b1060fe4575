"""The console command ``mtl-predict`` outside the workflow: its measured inference batch size is
kept where its help says, so the second call does not measure again."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from mtl.cli import default_cache_dir, predict_main
from mtl.model_file import export_model
from mtl.models import build_backbone, save_encoder

NORMALIZE = {"mean": [0.5] * 3, "std": [0.25] * 3}


def write_images(folder, classes, per_class, size=16):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for k in range(per_class):
            path = folder / name / f"{k}.png" if name else folder / f"q{c}{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.integers(0, 40, (size, size, 3)) + 80 * c).astype(np.uint8)).save(path)


def test_auto_batch_size_is_measured_once_and_kept_in_the_user_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # platformdirs' user cache on Linux
    torch.manual_seed(0)
    save_encoder(build_backbone("resnet12", width=0.125), tmp_path / "enc.pt", image_size=16, normalize=NORMALIZE)
    model = export_model("proto", tmp_path / "enc.pt", tmp_path / "seed1.pt", trained_on="toy", seed=1, shot=1,
                         way=2, data_sha256={"train": None, "val": None}, stored_image_size=16, config={})
    write_images(tmp_path / "support", ["a", "b"], 2)
    write_images(tmp_path / "query", [None, None], 2)
    assert str(default_cache_dir()).startswith(str(tmp_path / "xdg"))
    args = ["--model", str(model), "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
            "--out", str(tmp_path / "out.csv"), "--device", "cpu"]
    assert predict_main(args) == 0
    cached = list(default_cache_dir().glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()), "the measurement was not kept"
    before = cached[0].stat().st_mtime_ns
    assert predict_main(args) == 0
    assert cached[0].stat().st_mtime_ns == before, "the second call measured again"
