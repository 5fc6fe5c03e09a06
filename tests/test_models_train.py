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


def test_eeg_views_are_shifted_flipped_renders_drawn_into_batches(tmp_path):
    """EEG training views: each EEG row of a batch is one of its segment's views or the segment as
    drawn; other rows are untouched, and an epoch is count + 1 passes."""
    from models import eeg
    from models.data import model_inputs
    from models.preprocess import PreprocessContract
    from models.train import Trainer, pick_views, resolve_config

    rng = np.random.default_rng(0)
    t = np.arange(4097) / eeg.BONN_SAMPLING_HZ
    records = []
    for label, hz in (("slow", 3.0), ("alpha", 10.0)):
        for i in range(6):
            path = tmp_path / f"{label}{i}.txt"
            signal = 120 * np.sin(2 * np.pi * hz * t + i) * np.exp(-t / 6) + rng.normal(0, 10, t.size)
            np.savetxt(path, np.rint(signal), fmt="%d")
            records.append(Record(path.name, path, "eeg", label, "train"))
    samples = eeg.read_bonn_txt(records[0].path)
    view = eeg.training_view(samples, np.random.default_rng(1))
    assert np.array_equal(np.sort(np.abs(view)), np.sort(np.abs(samples)))  # a shift, maybe negated
    assert not np.array_equal(view, samples)

    config = resolve_config("ours", "full", epochs=1, batch_size=6, data="synthetic")
    config.update(modalities=["eeg"], eeg_views={"count": 3, "polarity": True})
    config["arch_kwargs"] = dict(config["arch_kwargs"], input_size=32, widths=[16, 32, 64])
    contract = PreprocessContract(input_size=32, eeg_render=config["eeg_render"])
    inputs = model_inputs(records, contract)
    trainer = Trainer(config, tmp_path / "run", records, inputs, records[::3], inputs[::3])
    assert trainer.eeg_views is not None and trainer.eeg_views.shape == (12, 3, 1, 32, 32)
    assert trainer.passes == 4
    for row in range(12):  # each view is a different picture of the same segment
        assert all(not np.array_equal(trainer.eeg_views[row, v], inputs[row]) for v in range(3))

    seen = set()
    view_rows = trainer.view_rows.copy()
    view_rows[:2] = -1  # as if the first two were pictures of another modality: never replaced
    for draw in range(40):
        idx = np.arange(12)
        batch = pick_views(inputs, idx, trainer.eeg_views, view_rows, np.random.default_rng(draw))
        assert np.array_equal(batch[:2], inputs[:2])
        for row in range(2, 12):
            options = [inputs[row], *trainer.eeg_views[row]]
            matches = [k for k, option in enumerate(options) if np.array_equal(batch[row], option)]
            assert len(matches) == 1
            seen.add(matches[0])
    assert seen == {0, 1, 2, 3}
    assert trainer.fit() and trainer.step == 4 * 12 // 6  # four passes of two batches
