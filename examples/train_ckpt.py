"""Checkpoints in safetensors and an EMA of the weights, for examples/train.py (DDP, FSDP2 or one process).

A checkpoint is a folder:
  model.safetensors      the model's full state_dict (the keys of `model.state_dict()`): loads into
                         `composer.build(...)` with `load_state_dict`, or timm's `checkpoint_path=`
  ema.safetensors        the same keys, the EMA weights (present when training keeps an EMA)
  optimizer.safetensors  the optimizer's state, one tensor per parameter and slot under
                         `state.<parameter name>.<slot>` (`state.stages.0.blocks.1.conv1.weight.exp_avg`);
                         the metadata holds the param groups (hyper-parameters and parameter names,
                         JSON), the step and the run's arguments

Why safetensors for the optimizer too, not a `torch.save` sidecar: one format for the whole folder,
no pickle (loading runs no code, and the file reads anywhere safetensors does), and the state is
keyed by parameter name rather than by position in the optimizer, so it stays readable and survives
a change of wrapping: `torch.distributed.checkpoint.state_dict` gives the same full, name-keyed state
for a plain module, DDP and FSDP2, so a DDP run resumes under FSDP2 and the other way round.
Every process reads the folder when resuming (a shared file system, as torchrun on one machine has).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

FORMAT = "composer-train-1"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class EMA:
    """An exponential moving average of a model's floating-point parameters and buffers, kept beside
    the model (sharded like it under FSDP2): shadow = d * shadow + (1 - d) * weights, with timm's
    warm-up d = min(decay, (1 + step) / (10 + step)) so that the average follows the early steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        keys = set(model.state_dict().keys())
        self.shadow = {name: t.detach().clone() for name, t in _tensors(model) if name in keys}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, t in _tensors(model):
            if name in self.shadow:
                self.shadow[name].lerp_(t.detach(), 1.0 - d)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """The EMA weights in the model for the duration (for evaluation), the trained ones after."""
        for m in model.modules():  # FSDP2 may hold the last forward's gathered weights: shard them
            if hasattr(m, "reshard") and hasattr(m, "unshard"):
                m.reshard()
        live = dict(_tensors(model))
        kept = {name: live[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, s in self.shadow.items():
                live[name].copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in kept.items():
                    live[name].copy_(t)

    def full_state(self) -> dict:
        """Full tensors on the CPU (a collective under FSDP2: every process calls it)."""
        return {name: (s.full_tensor() if isinstance(s, DTensor) else s).detach().cpu()
                for name, s in self.shadow.items()}

    @torch.no_grad()
    def load_full_state(self, full: dict) -> None:
        for name, s in self.shadow.items():
            value = full[name].to(s.device if not isinstance(s, DTensor) else s.to_local().device, s.dtype)
            if isinstance(s, DTensor):
                value = distribute_tensor(value, s.device_mesh, s.placements)
            s.copy_(value)


def _tensors(model):
    """Floating-point parameters and buffers by state_dict name."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            yield name, t


def _flat_optimizer(osd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pname, slots in osd["state"].items():
        for slot, value in slots.items():
            key = f"state.{pname}.{slot}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": json.dumps(osd["param_groups"]), "scalars": json.dumps(scalars)}


def _nested_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in [*tensors.items(), *json.loads(meta["scalars"]).items()]:
        pname, slot = key[len("state."):].rsplit(".", 1)
        state.setdefault(pname, {})[slot] = value
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def _write(path: Path, tensors: dict, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files 0600; follow the umask as open() does
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint whole


def save_checkpoint(folder, model, optimizer, ema, step: int, args: dict) -> None:
    """Write the folder (rank 0 writes; every process must call: gathering shards is collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    ema_state = ema.full_state() if ema is not None else None
    if _rank() == 0:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "step": str(step), "args": json.dumps(args, default=str)}
        _write(folder / "model.safetensors", weights, meta)
        if ema_state is not None:
            _write(folder / "ema.safetensors", {**weights, **ema_state}, {**meta, "ema_decay": str(ema.decay)})
        tensors, optim_meta = _flat_optimizer(optim)
        _write(folder / "optimizer.safetensors", tensors, {**meta, **optim_meta})
    _barrier()


def load_checkpoint(folder, model, optimizer, ema) -> int:
    """Load model, optimizer and EMA state from the folder; returns the step to continue from."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / "optimizer.safetensors").is_file():
        raise SystemExit(f"error: no checkpoint to resume in {folder} (optimizer.safetensors is missing)")
    with safe_open(str(folder / "optimizer.safetensors"), "pt") as f:
        meta = f.metadata()
    if meta.get("format") != FORMAT:
        raise SystemExit(f"error: {folder}/optimizer.safetensors is not a {FORMAT} checkpoint")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(str(folder / "model.safetensors")), options=options)
    optim = _nested_optimizer(load_file(str(folder / "optimizer.safetensors")), meta)
    set_optimizer_state_dict(model, optimizer, optim, options=options)
    if ema is not None:
        ema_file = folder / "ema.safetensors"
        ema.load_full_state(load_file(str(ema_file if ema_file.exists() else folder / "model.safetensors")))
    return int(meta["step"])
