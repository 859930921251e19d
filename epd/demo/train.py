"""Train the built-in demo model from scratch and write a complete checkpoint directory.

    python -m epd.demo.train --out DIR [--seed S] [--device cpu|cuda] [--steps N | --minutes M]
    python -m epd.demo.train --out DIR --quick      # a few steps of a tiny model (smoke test)

Each step draws fresh samples (a pure function of seed and step, see `epd.demo.data`), so
there is no dataset to overfit. At the end the model is saved (`save_pretrained` plus the
tokenizer, processor and generation configs), reloaded in transformers, and scored on
held-out seeds; the accuracy report is printed and kept in `DIR/train_report.json`.
`--minutes M` times a few steps first and picks the step count that fits M minutes; it
prints that count, and `--steps N` with it repeats the run.

The shipped `epd/demo/model` is this script with its defaults on one NVIDIA H200 (1500 steps
of 128 samples, 161 s of training, ~3 min in all; its `train_report.json` keeps the record).
A GPU is the practical choice: the same steps take ~10 s each on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from epd.demo.checkpoint import SIZES, describe, init_model_dir, save_model
from epd.demo.data import Mixture, TrainBatches
from epd.demo.evaluate import evaluate_dir
from epd.demo.fast_attention import fast_vision_attention


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the epd demo model (shapes task).")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=None, help="pick --steps to train for about this long")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--multi-fraction", type=float, default=0.5, help="share of 2-4 image samples")
    p.add_argument("--single-only", type=float, default=0.1, help="first fraction of steps: one image only")
    p.add_argument("--workers", type=int, default=max(0, min(14, (os.cpu_count() or 1) - 2)))
    p.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--eval-single", type=int, default=200)
    p.add_argument("--eval-multi", type=int, default=100)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps, 2+2 eval: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.minutes, args.batch_size = "tiny", 3, None, 2
        args.warmup, args.workers, args.eval_single, args.eval_multi = 1, 0, 2, 2
        args.log_every, args.save_dtype = 1, "float32"
    return args


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def batches(args: argparse.Namespace, steps: int) -> torch.utils.data.DataLoader:
    """Loader over steps [0, steps): workers build batches in parallel, delivered in step order."""
    mixture = Mixture(args.multi_fraction, int(args.single_only * steps))
    data = TrainBatches(args.out, args.seed, args.batch_size, steps, mixture)
    return torch.utils.data.DataLoader(
        data,
        batch_size=None,
        num_workers=args.workers,
        worker_init_fn=_one_thread,
        prefetch_factor=4 if args.workers else None,
        pin_memory=args.device.startswith("cuda"),
    )


def _one_thread(_: int) -> None:
    # Workers are many; one thread each keeps them from fighting over cores.
    torch.set_num_threads(1)


class Trainer:
    """The model, its optimiser and the step function; knows nothing about data order."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace):
        self.device = torch.device(args.device)
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05, eps=1e-8
        )
        self.args = args
        self.autocast = self.device.type == "cuda"  # bf16 matmuls on the GPU, fp32 on the CPU

    def step(self, batch: dict[str, torch.Tensor], step: int, total: int) -> torch.Tensor:
        """One optimiser step; returns the loss (on the device, unsynchronised)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * lr_factor(step, self.args.warmup, total)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def calibrate_steps(trainer: Trainer, args: argparse.Namespace, warmup: int = 20, timed: int = 40) -> int:
    """Steps that fit `args.minutes`, timed on real steps once the data workers are up (then discarded)."""
    loader = iter(batches(args, warmup + timed))
    with fast_vision_attention(trainer.model):
        for i in range(warmup + timed):
            if i == warmup:
                _sync(trainer.device)
                start = time.perf_counter()
            trainer.step(next(loader), i, warmup + timed)
        _sync(trainer.device)
    per_step = (time.perf_counter() - start) / timed
    steps = int(args.minutes * 60 / per_step)
    print(f"calibration: {per_step * 1000:.1f} ms/step -> --steps {steps} for {args.minutes} min", flush=True)
    return steps


def train(trainer: Trainer, args: argparse.Namespace, steps: int) -> float:
    """Run `steps` optimiser steps; return the mean loss of the last logging window."""
    window, last, start = [], float("nan"), time.perf_counter()
    for step, batch in enumerate(batches(args, steps)):
        window.append(trainer.step(batch, step, steps))
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            last = torch.stack(window).mean().item()
            window.clear()
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{steps}  loss {last:.4f}  {elapsed:.0f}s", flush=True)
    return last


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    """Train, save, evaluate; returns the report written to `out/train_report.json`."""
    args = parse_args(argv)
    started = time.perf_counter()
    size = SIZES[args.size]
    if args.minutes is not None:
        args.steps = calibrate_steps(Trainer(init_model_dir(args.out, size, args.seed)[0], args), args)
    model, ids = init_model_dir(args.out, size, args.seed)  # same seed: the same initial weights
    print(describe(size, model), flush=True)
    trainer = Trainer(model, args)
    with fast_vision_attention(trainer.model):
        train_start = time.perf_counter()
        final_loss = train(trainer, args, args.steps)
        _sync(trainer.device)
        train_seconds = time.perf_counter() - train_start
    save_model(trainer.model, args.out, ids, getattr(torch, args.save_dtype))
    result = evaluate_dir(args.out, args.eval_single, args.eval_multi, args.device)
    report = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "size": asdict(size),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "machine": machine(args.device),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "final_loss": final_loss,
        "accuracy": {"single": result.single, "multi": result.multi},
        "eval": {"single": result.num_single, "multi": result.num_multi, "seeds": "eval/..."},
    }
    Path(args.out, "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"trained {args.steps} steps in {train_seconds:.0f}s on {report['machine']}")
    print("\n".join(result.lines()), flush=True)
    return report


if __name__ == "__main__":
    main()
