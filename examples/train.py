"""Train a composer model with DDP or FSDP2 under torchrun, or as one plain process.

A realistic loop around one `composer.build(...)` call: a learnable synthetic dataset (the class
is the pattern: stripes, checkerboards, blobs for images; sine, square, sawtooth, pulses for 1-D
signals) read through a DataLoader with a DistributedSampler; AdamW without weight decay on norms,
biases and `model.no_weight_decay()`; a cosine schedule with linear warm-up; bf16 autocast;
channels_last; optional `torch.compile`; an EMA of the weights; the blueprint's own loss
(`composer.build_loss`); checkpoints in safetensors that a later run resumes from; a progress bar
(tqdm when installed, plain lines otherwise).

    python examples/train.py --steps 200                                   # one process
    torchrun --standalone --nproc_per_node 2 examples/train.py --out run   # DDP: gloo on CPU, NCCL on GPUs
    torchrun --standalone --nproc_per_node 8 examples/train.py --model resnet18 --img-size 64 --fsdp --compile
    torchrun --standalone --nproc_per_node 2 examples/train.py --out run --steps 400 --resume

The checkpoint folder (`--out`) holds `model.safetensors` (the model's own state_dict: loads into
`composer.build(...)` or timm's `checkpoint_path=`), `ema.safetensors` and `optimizer.safetensors`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import composer  # noqa: E402
from composer.ops.loss import BinaryCrossEntropy, CoarseToFine, Focal, HardDistillation  # noqa: E402
from train_ckpt import EMA, load_checkpoint, save_checkpoint  # noqa: E402

CLASSES = 4


class Patterns(Dataset):
    """`n` samples of `shape` (channels, *spatial), each made on demand from (seed, index): the label
    is index % 4 and the class is in the pattern (random colours, period, phase and noise), so a
    model can learn it and a sample is the same in every process and every epoch."""

    def __init__(self, n: int, shape: tuple, seed: int):
        if len(shape) not in (2, 3):
            raise SystemExit(f"error: the synthetic data has 1-D or 2-D inputs; this model takes {shape}")
        self.n, self.shape, self.seed = n, tuple(shape), seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        c = i % CLASSES
        channels, *spatial = self.shape
        period = min(spatial) / 8 * (1 + torch.rand(1, generator=g).item())
        phase = 2 * math.pi * torch.rand(1, generator=g).item()
        axes = [torch.arange(s, dtype=torch.float32) for s in spatial]
        if len(spatial) == 1:
            t = (axes[0] / period + phase / (2 * math.pi)) % 1.0
            pattern = [torch.sin(2 * math.pi * t), torch.where(t < 0.5, 1.0, -1.0), 2 * t - 1,
                       torch.where(t < 0.15, 1.0, -1.0)][c]  # sine, square, sawtooth, pulses
        else:
            yy, xx = torch.meshgrid(*axes, indexing="ij")
            sy, sx = torch.sin(2 * math.pi * yy / period + phase), torch.sin(2 * math.pi * xx / period + phase)
            if c < 3:
                pattern = [sy, sx, sy * sx][c]
            else:
                cy, cx = (torch.rand(2, generator=g) * torch.tensor(spatial)).tolist()
                r = min(spatial) / 6 * (1 + torch.rand(1, generator=g).item())
                pattern = 2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) - 1
        mask = (pattern + 1) / 2
        view = (channels,) + (1,) * len(spatial)
        fg = torch.rand(view, generator=g)  # two colours at least 0.3 apart in every channel
        bg = (fg + 0.3 + 0.4 * torch.rand(view, generator=g)) % 1.0
        x = fg * mask + bg * (1 - mask) + 0.1 * torch.randn(self.shape, generator=g)
        return (x - 0.5) / 0.25, c


def lr_at(step: int, args) -> float:
    """Linear warm-up to `lr`, then a half cosine down to `lr * min_lr`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def param_groups(model, weight_decay: float):
    """timm's rule: no weight decay on 1-D parameters (norms, biases, scales) and on what the model's
    `no_weight_decay()` names (position tables, tokens). Frozen parameters are left out."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def criterion_for(args):
    """The blueprint's loss, and how the targets it needs are made from class indices."""
    loss = composer.build_loss(args.model, **model_overrides(args))
    kind = composer.load(args.model, **model_overrides(args)).loss
    multi_label = isinstance(kind, BinaryCrossEntropy) or (isinstance(kind, Focal) and kind.multi_label)

    def compute(out, y):
        if isinstance(kind, HardDistillation):  # no teacher here: the labels stand in for its predictions
            return loss(out, y, F.one_hot(y, CLASSES).float())
        if isinstance(kind, CoarseToFine) or not isinstance(out, (tuple, list)):
            return loss(out, F.one_hot(y, CLASSES).float() if multi_label else y)
        return sum(loss(o, y) for o in out) / len(out)  # a training forward with several heads

    return compute


def model_overrides(args) -> dict:
    return {"num_classes": CLASSES, **({"img_size": args.img_size} if args.img_size else {})}


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model, args, device):
    """DDP, or FSDP2: `fully_shard` on every block, then on the whole model."""
    if not dist.is_initialized():
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for stage in model.stages:
            for block in stage.blocks:
                fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, loader, device, args) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    total = [0.0, 0.0, 0.0]
    for x, y in loader:
        x, y = to_device(x, y, device, args)
        with autocast(device, args):
            logits = model(x)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        total[0] += F.cross_entropy(logits.float(), y, reduction="sum").item()
        total[1] += (logits.argmax(1) == y).sum().item()
        total[2] += len(y)
    model.train(was_training)
    loss, correct, n = all_sum(total, device)
    return loss / n, correct / n


def autocast(device, args):
    if args.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x, y, device, args):
    x = x.to(device, non_blocking=True)
    if args.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def progress(total: int, initial: int, rank: int, enabled: bool):
    """A tqdm bar on rank 0 when tqdm is installed (an optional dependency), else nothing."""
    if rank != 0 or not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(HERE / "tiny_convnet.arch"), help="a zoo name or FILE[:MODEL]")
    p.add_argument("--img-size", type=int, default=None, help="the input size (default: the model's own)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    p.add_argument("--batch", type=int, default=32, help="samples per process and step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=0.01, help="the final learning rate, a fraction of --lr")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay (0: no EMA)")
    p.add_argument("--train-size", type=int, default=4096)
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block) instead of DDP")
    p.add_argument("--out", default=None, help="checkpoint folder (written every --save-every steps and at the end)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--stop-at", type=int, default=None,
                   help="end this run at this step (saved) though the schedule spans --steps: a later --resume goes on")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help="plain log lines only, no progress bar")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.resume and not args.out:
        p.error("--resume needs --out")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    start = time.time()

    try:
        model = composer.build(args.model, seed=args.seed, **model_overrides(args))  # same weights everywhere
    except composer.ComposerError as exc:  # a blueprint or size the model refuses: its located message
        print(exc.render(), file=sys.stderr)
        return 2
    shape = (model.plan.input.channels, *model.plan.input.spatial)
    torch.manual_seed(args.seed + rank)  # dropout and drop path differ between processes
    model.to(device)
    if args.channels_last and len(shape) == 3 and not (args.fsdp and world > 1):
        model.to(memory_format=torch.channels_last)  # FSDP2 shards contiguous parameters only: there
        # the inputs alone are channels_last (convolutions then run and answer in that layout)
    core = model  # the ComposedModel: its state_dict keys are the checkpoint's
    compute_loss = criterion_for(args)
    model = wrap(model, args, device)
    optimizer = torch.optim.AdamW(param_groups(core, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    ema = EMA(core, args.ema) if args.ema > 0 else None
    n_params = sum(p.numel() for p in core.parameters())
    say(f"model {args.model}: {n_params:,} parameters, input {shape}, {world} process(es) on {device.type}"
        f"{' (FSDP2)' if args.fsdp and world > 1 else ' (DDP)' if world > 1 else ''}")

    step = 0
    if args.resume:
        step = load_checkpoint(args.out, core, optimizer, ema)
        say(f"resumed from step {step} ({args.out})")
    if args.compile:
        model = torch.compile(model)

    train_set = Patterns(args.train_size, shape, seed=args.seed)
    val_set = Patterns(args.val_size, shape, seed=args.seed + 1)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    loader_kw = {"num_workers": args.workers, "pin_memory": device.type == "cuda",
                 "persistent_workers": args.workers > 0}
    loader = DataLoader(train_set, args.batch, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = DataLoader(val_set, args.batch, sampler=val_sampler, **loader_kw)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise SystemExit("error: --train-size is smaller than one global batch")

    if step == 0:
        loss0, acc0 = evaluate(model, val_loader, device, args)
        say(f"before training: val loss {loss0:.4f}  val acc {acc0:.3f}  (chance {1 / CLASSES:.3f})")
    bar = progress(args.steps, step, rank, not args.no_progress)
    log = bar.write if bar is not None else say
    model.train()
    stop = min(args.steps, args.stop_at or args.steps)
    while step < stop:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i < skip:  # resuming mid-epoch: the batches this epoch already trained on
                continue
            if step >= stop:
                break
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = to_device(x, y, device, args)
            with autocast(device, args):
                out = model(x)
            loss = compute_loss(out.float() if torch.is_tensor(out) else [o.float() for o in out], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(core, step)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if step % args.log_every == 0 or step == stop:
                log(f"step {step}/{args.steps}  epoch {epoch}  train loss {loss.item():.4f}  lr {lr:.2e}")
            if args.out and args.save_every and step % args.save_every == 0:
                save_checkpoint(args.out, core, optimizer, ema, step, vars(args))
    if bar is not None:
        bar.close()

    val_loss, val_acc = evaluate(model, val_loader, device, args)
    summary = {"step": step, "val_loss": val_loss, "val_acc": val_acc}
    if ema is not None:
        with ema.swapped_into(core):
            summary["ema_val_loss"], summary["ema_val_acc"] = evaluate(model, val_loader, device, args)
    if args.out:
        save_checkpoint(args.out, core, optimizer, ema, step, vars(args))
    say(f"after training: val loss {val_loss:.4f}  val acc {val_acc:.3f}"
        + (f"  EMA val acc {summary['ema_val_acc']:.3f}" if ema is not None else ""))
    say("result " + json.dumps(summary))
    say(f"done in {time.time() - start:.1f} s")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
