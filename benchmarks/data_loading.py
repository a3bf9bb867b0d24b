"""How fast Omniglot episodes load, against the cost of a Conv4 contrastive meta-step.

Prints the decode time and in-memory size of the images, then tasks per second and the time per
meta-batch for 5-way 1-shot (meta-batch 32) and 20-way 1-shot (meta-batch 16), 15 queries per class,
as the training loader delivers them (with a progress bar). With ``--meta-step`` it also times the
contrastive meta-gradient of a Conv4 complex synapse on the first two tasks of such a meta-batch, with
a single free and a single nudged step per phase, and scales it to the whole meta-batch (tasks are
independent): a lower bound on a real meta-step (the reference settings run 100-200 steps per phase),
so the printed loading share is an upper bound.

    python -m benchmarks.data_loading [--root PATH] [--batches 50] [--meta-step] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import omniglot_root
from lightning_contrastive.data.omniglot import OmniglotDataModule, read_omniglot

SETTINGS = {"5-way 1-shot": {"ways": 5, "batch_size": 32}, "20-way 1-shot": {"ways": 20, "batch_size": 16}}


def time_decoding(root: Path) -> None:
    start = time.perf_counter()
    decoded = read_omniglot(root)
    decode_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        read_omniglot(root, cache_dir=cache)
        start = time.perf_counter()
        read_omniglot(root, cache_dir=cache)
        cached_s = time.perf_counter() - start
    print(
        f"decoded {len(decoded.images)} images of {len(decoded.characters)} characters in {decode_s:.2f} s "
        f"({decoded.images.nbytes / 2**20:.2f} MiB uint8 {tuple(decoded.images.shape[1:])}); "
        f"from the on-disk cache: {cached_s * 1000:.0f} ms"
    )


def time_loading(root: Path, name: str, ways: int, batch_size: int, batches: int) -> tuple[float, dict]:
    module = OmniglotDataModule(str(root), ways=ways, shots=1, test_shots=15, batch_size=batch_size)
    module.setup()
    loader = module.train_dataloader()
    iterator = iter(loader)
    batch = next(iterator)  # warm-up
    start = time.perf_counter()
    for _ in tqdm(range(batches), desc=name, unit="meta-batch", leave=False):
        next(iterator)
    per_batch = (time.perf_counter() - start) / batches
    print(
        f"{name} (meta-batch {batch_size}, 15 queries): {batch_size / per_batch:8.0f} tasks/s, "
        f"{per_batch * 1000:6.1f} ms per meta-batch; x {tuple(batch['train'][0].shape)}, "
        f"{tuple(batch['test'][0].shape)}"
    )
    return per_batch, batch


def time_meta_step(batch: dict, ways: int, tasks: int = 2) -> float:
    """Seconds for a minimal contrastive meta-step on the whole meta-batch, timed on its first ``tasks``."""
    from lightning_contrastive import ComplexSynapse, Contrastive, meta_gradient
    from lightning_contrastive.networks import Conv4

    learner = ComplexSynapse(Conv4(in_channels=1, ways=ways, channels=64, image_size=28), init_lambda=0.5)
    estimator = Contrastive(beta=0.03, symmetric=True, inner_steps=1, nudged_steps=1)
    first_tasks = {key: (x[:tasks], y[:tasks]) for key, (x, y) in batch.items()}
    start = time.perf_counter()
    meta_gradient(learner, estimator, first_tasks)
    return (time.perf_counter() - start) * len(batch["train"][0]) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=omniglot_root(), help="folder of the Omniglot zips (default: %(default)s)"
    )
    parser.add_argument("--batches", type=int, default=50, help="meta-batches timed per setting")
    parser.add_argument("--meta-step", action="store_true", help="also time a minimal Conv4 contrastive meta-step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    arguments = parser.parse_args()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs")
    time_decoding(arguments.root)
    for name, setting in SETTINGS.items():
        per_batch, batch = time_loading(arguments.root, name, batches=arguments.batches, **setting)
        if arguments.meta_step:
            step = time_meta_step(batch, setting["ways"])
            print(
                f"    Conv4 contrastive meta-step (1 free + 1 nudged step per phase, a lower bound): {step:.1f} s; "
                f"loading is {100 * per_batch / step:.1f}% of it"
            )


if __name__ == "__main__":
    main()
