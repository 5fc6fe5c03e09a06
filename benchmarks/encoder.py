"""Serving cost of the encoders: images/s at batch 1 and 32, ONNX Runtime vs PyTorch, vs the shipped one.

For every model given (default: every ``models/weights/*.onnx``), on the CPU, in this process:

* **ONNX Runtime** (what the workers run): images/s of ``OnnxEncoder.embed`` at batch 1 and 32,
  one intra-op thread (per core) and the session's default threads;
* **PyTorch** (the reference): the same architecture, built from the card's ``architecture``
  and run in eval mode under ``torch.inference_mode`` with the same thread count. Its weights are
  freshly initialised: the time of a forward pass does not depend on the values of the weights;
* the ratio of each model's ONNX rate to the **reference model** in the same run, so a slower
  candidate shows as a ratio below 1: ``--reference`` (default the shipped ``ours-ae64.onnx``),
  or ``--reference-rev REV``, the shipped model as it was at git revision REV (e.g. the commit
  that shipped 1.1.0), taken out of git into a temporary folder with its sidecars;
* the EEG render each model's contract names (ms per 23.6 s segment), since serving draws it too.

Inputs are random pictures of the model's input size (time does not depend on the content). Each
rate is the median of ``--repeats`` timed runs of at least ``--seconds`` each, after a warm-up.

    .venv/bin/python benchmarks/encoder.py [--quick] [--model runs/models/x.onnx ...]
    .venv/bin/python benchmarks/encoder.py --reference-rev 68a1f65   # today's model vs 1.1.0
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common

from models import eeg
from models.runtime import WEIGHTS_DIR, OnnxEncoder

BATCHES = (1, 32)


def rate(run: Callable[[], object], batch: int, seconds: float, repeats: int) -> float:
    """Median images/s of ``run`` (one call = ``batch`` images) over ``repeats`` timed windows."""
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(calls * batch / elapsed)
    return statistics.median(rates)


def torch_runner(card: dict, threads: int, batch: np.ndarray) -> Callable[[], object]:
    """A forward pass of the card's architecture in PyTorch (eval, inference mode)."""
    import torch

    from models.network import build_model, encode

    torch.set_num_threads(threads)
    arch = dict(card["architecture"])
    name = arch.pop("name")
    arch.pop("summary", None)
    if name in ("backbone-head", "fused"):  # a packaged pretrained backbone and a head (models.transfer)
        from models.probe import load_backbone
        from models.transfer import BackboneHeadEncoder

        model = BackboneHeadEncoder(load_backbone(), hidden=int(arch["hidden"])).eval()
        if name == "fused":  # joined with an exported autoencoder (models.fusion)
            from models.fusion import FusedEncoder, autoencoder_from_onnx

            autoencoder, _, _ = autoencoder_from_onnx(WEIGHTS_DIR / arch["fused_with"]["file"])
            model = FusedEncoder(model, autoencoder).eval()
    else:
        if "widths" in arch:
            arch["widths"] = tuple(arch["widths"])
        model = build_model(name, **arch).eval()
    tensor = torch.from_numpy(batch)

    def run() -> object:
        with torch.inference_mode():
            return encode(model, tensor)

    return run


def render_ms(render: str, repeats: int) -> float:
    signal = np.random.default_rng(0).normal(0, 50, 4097)
    eeg.render_eeg(signal, eeg.BONN_SAMPLING_HZ, render)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        eeg.render_eeg(signal, eeg.BONN_SAMPLING_HZ, render)
        times.append((time.perf_counter() - start) * 1000)
    return common.median(times)


def model_at_revision(revision: str, folder: Path) -> Path:
    """``models/weights/ours-ae64.*`` as committed at ``revision``, written into ``folder``."""
    for suffix in (".onnx", ".card.json", ".preprocess.json"):
        name = f"ours-ae64{suffix}"
        blob = subprocess.run(
            ["git", "show", f"{revision}:models/weights/{name}"],
            cwd=common.REPO_ROOT,
            check=True,
            capture_output=True,
        ).stdout
        (folder / name).write_bytes(blob)
    return folder / "ours-ae64.onnx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="an ONNX encoder (repeatable)")
    parser.add_argument("--reference", type=Path, default=WEIGHTS_DIR / "ours-ae64.onnx")
    parser.add_argument("--reference-rev", help="compare against ours-ae64 as committed at this git revision")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed window")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="short windows (under a minute)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeats = 0.3, 3
    with tempfile.TemporaryDirectory() as folder:
        if args.reference_rev:
            args.reference = model_at_revision(args.reference_rev, Path(folder))
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    """Print the tables for ``args.model`` against ``args.reference``."""
    models = args.model or sorted(WEIGHTS_DIR.glob("*.onnx"))
    if args.reference not in models:
        models = [args.reference, *models]
    print(common.machine_line())
    rng = np.random.default_rng(0)
    onnx_rates: dict[tuple[Path, int, int], float] = {}
    rows = []
    for threads in (1, 0):
        for path in models:
            for batch_size in BATCHES:
                encoder = OnnxEncoder(path, device="cpu", intra_op_threads=threads or None)
                batch = rng.random((batch_size, *encoder.input_shape), dtype=np.float32)
                ours = rate(partial(encoder.embed, batch), batch_size, args.seconds, args.repeats)
                reference_torch = rate(
                    torch_runner(encoder.card, threads or 2, batch), batch_size, args.seconds, args.repeats
                )
                onnx_rates[(path, threads, batch_size)] = ours
                rows.append(
                    [
                        f"{path.name} ({encoder.version})",
                        encoder.contract.input_size,
                        threads or "default",
                        batch_size,
                        ours,
                        reference_torch,
                        ours / reference_torch,
                    ]
                )
    for row, key in zip(rows, onnx_rates, strict=True):
        row.append(onnx_rates[key] / onnx_rates[(args.reference, key[1], key[2])])
    print(
        common.table(
            [
                "model",
                "input",
                "threads",
                "batch",
                "ONNX images/s",
                "PyTorch images/s",
                "ONNX / PyTorch",
                f"vs {args.reference.name}",
            ],
            rows,
            title="Encoder serving cost on the CPU (images/s; higher is better)",
        )
    )
    renders = sorted({OnnxEncoder(p, device="cpu").contract.eeg_render for p in models})
    print(
        common.table(
            ["EEG render", "ms per 23.6 s segment"],
            [[name, render_ms(name, 20 if args.quick else 200)] for name in renders],
            title="EEG render each model's contract names (the worker draws it before preprocessing)",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
