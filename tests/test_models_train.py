"""Training: a tiny run lowers the loss, checkpoints resume, the small config runs on real data."""

import json

import numpy as np
import pytest

from models.data import Record, shared_data_dir

torch = pytest.importorskip("torch")


def synthetic(n_per_class=24, size=16, seed=0):
    rng = np.random.default_rng(seed)
    records, inputs = [], []
    yy, xx = np.mgrid[0:size, 0:size] / size
    patterns = {"xray/a": xx, "xray/b": yy, "mri/c": (xx - 0.5) ** 2 + (yy - 0.5) ** 2}
    for finding, pattern in patterns.items():
        modality, label = finding.split("/")
        for i in range(n_per_class):
            img = np.clip(pattern + rng.normal(0, 0.05, pattern.shape), 0, 1)
            records.append(Record(f"{finding}/{i}", None, modality, label, "train"))
            inputs.append(img[None].astype(np.float32))
    return records, np.stack(inputs)


def make_trainer(tmp_path, arch="paper", epochs=3, **extra):
    from models.train import Trainer, resolve_config

    records, inputs = synthetic()
    config = resolve_config(arch, "full", epochs=epochs, batch_size=12, data="synthetic", **extra)
    config["arch_kwargs"] = dict(config["arch_kwargs"], input_size=16)
    return Trainer(config, tmp_path, records, inputs, records[::4], inputs[::4])


def test_tiny_training_lowers_the_loss_and_writes_artifacts(tmp_path):
    torch.set_num_threads(2)
    trainer = make_trainer(tmp_path, epochs=4)
    assert trainer.fit()
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lr"] == 1e-3 and config["lr_decay"] == 2e-5 and config["objective"] == {"mse": 1.0}
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert (
        best["embedding_dim"] == 48
        and best["best_epoch"] == min(history, key=lambda h: h["val_loss"])["epoch"]
    )
    # Keras-style decay: lr = lr0 / (1 + decay * iterations)
    assert history[-1]["lr"] == pytest.approx(1e-3 / (1 + 2e-5 * trainer.step))


def test_resume_continues_where_it_stopped(tmp_path):
    torch.set_num_threads(2)
    interrupted = make_trainer(tmp_path / "a", epochs=2)
    assert not interrupted.fit(max_minutes=1e-9)  # stops after epoch 1
    resumed = make_trainer(tmp_path / "a", epochs=2)
    resumed.resume()
    assert resumed.epoch == 1 and resumed.step == interrupted.step
    assert resumed.fit()
    straight = make_trainer(tmp_path / "b", epochs=2)
    assert straight.fit()
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-5)


def test_supcon_objective_trains_gem_with_whitening(tmp_path):
    torch.set_num_threads(2)
    trainer = make_trainer(tmp_path, arch="gem", epochs=2)
    trainer.config["arch_kwargs"] = dict(trainer.config["arch_kwargs"])
    assert trainer.fit()
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["whitened"] and "val_map@10" in best["whitening_val"]


@pytest.mark.slow
def test_small_config_on_shared_data(tmp_path):
    if not (shared_data_dir() / "manifest.csv").is_file():
        pytest.skip("shared data not available")
    import argparse

    from models.train import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--arch",
            "paper",
            "--config",
            "small",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "subset.train=6",
            "--set",
            "subset.val=3",
            "--epochs",
            "2",
        ]
    )
    assert run(args) == 0
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]


def test_augmentation_can_spare_a_modality(tmp_path):
    """Step 8's recipe augments the pictures but leaves EEG traces (fixed time/µV scale) untouched."""
    from models.train import augment_selected

    trainer = make_trainer(tmp_path, augment=["xray"])
    modalities = np.array([r.modality for r in trainer.train_records])
    assert trainer.augment_mask.tolist() == (modalities == "xray").tolist()
    idx = np.arange(len(modalities))
    x = torch.from_numpy(trainer.train_inputs[idx])
    out = augment_selected(x, trainer.augment_mask[idx], torch.Generator().manual_seed(0))
    spared, augmented = ~trainer.augment_mask[idx], trainer.augment_mask[idx]
    assert torch.equal(out[torch.from_numpy(spared)], x[torch.from_numpy(spared)])
    assert not torch.allclose(out[torch.from_numpy(augmented)], x[torch.from_numpy(augmented)])
    assert make_trainer(tmp_path, augment=False).augment_mask.sum() == 0
    assert make_trainer(tmp_path, augment=True).augment_mask.all()


def test_device_choice_is_checked(tmp_path):
    """--device cuda on a machine without a GPU is a clear error, not a silent CPU run."""
    from models.errors import ConfigError
    from models.train import main, resolve_torch_device

    assert resolve_torch_device("cpu").type == "cpu"
    assert resolve_torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_torch_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_torch_device("cuda")
        assert main(["--arch", "paper", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
        assert not (tmp_path / "run").exists()
