"""Train a tiny blueprint on a synthetic dataset with plain PyTorch.

Builds `examples/tiny_convnet.arch` with composer, makes a small four-class dataset of coloured
patterns (horizontal stripes, vertical stripes, checkerboards, blobs) from a fixed seed, trains it
for a few dozen AdamW steps with cross-entropy, and checks that the loss went down. Nothing here is
specific to composer except the one `composer.build(...)` call: the model is an ordinary
`nn.Module`.

    python examples/train_tiny.py [--steps 60] [--blueprint examples/tiny_convnet.arch]

Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import composer  # noqa: E402

CLASSES = ("hstripes", "vstripes", "checker", "blob")


def make_dataset(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (n, 3, size, size) and labels: one pattern per class, random colours, period,
    phase and noise, so that the class is in the pattern, not in the colour."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = torch.empty(n, 3, size, size)
    for k in range(n):
        period = 4 + 4 * torch.rand(1, generator=g).item()
        phase = 2 * math.pi * torch.rand(1, generator=g).item()
        c = int(labels[k])
        if c == 0:
            pattern = torch.sin(2 * math.pi * yy / period + phase)
        elif c == 1:
            pattern = torch.sin(2 * math.pi * xx / period + phase)
        elif c == 2:
            pattern = torch.sin(2 * math.pi * yy / period + phase) * torch.sin(2 * math.pi * xx / period + phase)
        else:
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = size / 6 + size / 6 * torch.rand(1, generator=g).item()
            pattern = 2 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) - 1
        fg, bg = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        mask = (pattern + 1) / 2  # 0..1
        img = fg * mask + bg * (1 - mask)
        images[k] = img + 0.1 * torch.randn(3, size, size, generator=g)
    images = (images - 0.5) / 0.25
    return images, labels


@torch.no_grad()
def evaluate(model, images, labels) -> tuple[float, float]:
    model.eval()
    logits = model(images)
    model.train()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blueprint", default=str(HERE / "tiny_convnet.arch"), help="FILE[:MODEL] or a zoo name")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--img-size", type=int, default=32)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # small tensors: one thread is as fast and never oversubscribes
    start = time.time()

    model = composer.build(args.blueprint, num_classes=len(CLASSES), img_size=args.img_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.blueprint}  {n_params:,} parameters")

    train_x, train_y = make_dataset(384, args.img_size, seed=0)
    val_x, val_y = make_dataset(128, args.img_size, seed=1)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    initial_loss, initial_acc = evaluate(model, val_x, val_y)
    print(f"before training: val loss {initial_loss:.4f}  val acc {initial_acc:.2f}")

    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(train_x), (args.batch,), generator=g)
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  train loss {loss.item():.4f}")

    final_loss, final_acc = evaluate(model, val_x, val_y)
    print(f"after training:  val loss {final_loss:.4f}  val acc {final_acc:.2f}")
    print(f"initial_loss={initial_loss:.6f} final_loss={final_loss:.6f}")
    print(f"done in {time.time() - start:.1f} s")
    if not final_loss < initial_loss:
        print("error: the loss did not go down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
