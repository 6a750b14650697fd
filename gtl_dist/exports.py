"""Exports: one consolidated fp32 model per finished stage, loadable without DeepSpeed; the one
door through which training, sampling, evaluation and the cluster tasks read a stage's result.

``RunPaths.export(stage, ...)`` holds ``{"format", "meta", "state_dict"}`` (plain tensors and
plain Python values, so ``torch.load(weights_only=True)`` reads it) and a ``.json`` sidecar with
the same metadata, written after the weights, so that a finished stage can be recognised without
loading the weights. The metadata records the role, the full run config (to rebuild the model
through :func:`gtl_dist.models.build_model`), the vocabulary, sequence length, hashes, the step
and validation loss the weights come from, and which weights they are (EMA, best, final).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gtl_dist.config import RunConfig
from gtl_dist.io import atomic_path, atomic_write_json
from gtl_dist.paths import RunPaths
from gtl_dist.stages import stage_input_hash

EXPORT_FORMAT = "gtl_dist.export/1"


class ExportError(RuntimeError):
    """An export is missing or unusable; the message names the file and the stage to run."""


def meta_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def write_export(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    payload = {"format": EXPORT_FORMAT, "meta": meta,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_json(meta_path(path), meta)


def read_export_meta(path: Path) -> Optional[dict[str, Any]]:
    """The sidecar metadata of a complete export, or None if there is none."""
    side = meta_path(path)
    if not (Path(path).is_file() and side.is_file()):
        return None
    try:
        return json.loads(side.read_text())
    except ValueError:
        return None


def read_export(path: Path, stage_hint: str = "") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        hint = f"; run stage {stage_hint} first" if stage_hint else ""
        raise ExportError(f"{path}: no exported model here{hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ExportError(f"{path}: not a readable export ({exc}); delete it and re-run the stage "
                          f"that writes it") from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a gtl_dist export (format "
                          f"{payload.get('format') if isinstance(payload, dict) else '?'}, expected "
                          f"{EXPORT_FORMAT})")
    return payload


def upstream_export_path(cfg: RunConfig, paths: RunPaths, stage: str, target: Optional[str] = None,
                         fraction: Optional[float] = None, seed: int = 0, *, needed_by: str) -> Path:
    """The export a downstream task (``needed_by``) reads, checked to exist and to come from the
    inputs the current configuration gives its stage; else an ExportError naming the stage to
    run or re-run, with the command."""
    path = paths.export(stage, target, fraction, seed)
    where = "/".join(str(x) for x in (stage, target, fraction) if x is not None)
    command = (f"python -m gtl_dist.train --config <config> --run-dir {paths.root} --stage {stage}"
               + (f" --target {target}" if target is not None else "")
               + (f" --fraction {fraction}" if fraction is not None else "")
               + (f" --seed {seed}" if seed else ""))
    meta = read_export_meta(path)
    if meta is None:
        raise ExportError(f"{path}: {needed_by} needs the exported {where} model, which does not "
                          f"exist; run stage {stage} first: {command}")
    want = stage_input_hash(cfg, stage, target, fraction, seed)
    if meta.get("input_hash") != want:
        raise ExportError(f"{path}: exported {where} was trained with inputs hash "
                          f"{meta.get('input_hash')}, the current configuration gives {want}; "
                          f"re-run stage {stage} ({command}) before {needed_by}")
    return path


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model on ``device`` in eval mode; needs neither DeepSpeed nor the
    training world size. The metadata is attached as ``model.export_meta``."""
    from gtl_dist.config import config_from_dict
    from gtl_dist.models import VocabSpec, build_model

    payload = read_export(Path(path))
    meta = payload["meta"]
    cfg = config_from_dict(meta["config"], source=f"{path} (export metadata)", strict=False)
    model = build_model(meta["role"], cfg, VocabSpec(**meta["vocab"]))
    model.load_state_dict(payload["state_dict"])
    model.export_meta = meta
    return model.to(device).eval()


def load_upstream(cfg: RunConfig, paths: RunPaths, stage: str, target: Optional[str] = None,
                  fraction: Optional[float] = None, seed: int = 0, *, needed_by: str,
                  device: str | torch.device = "cpu") -> nn.Module:
    """The export of one upstream stage task, checked (:func:`upstream_export_path`) and loaded."""
    return load_exported(upstream_export_path(cfg, paths, stage, target, fraction, seed, needed_by=needed_by),
                         device)
