"""HTDemucs vocal removal: keep drums + bass + other, as the paper's data preparation does.

Loading uses demucs' own loaders and never downloads:
- a `.th` file (demucs' package format: klass, args, kwargs, state) -> `demucs.states.load_model`;
- a `.safetensors` file exported for the Hugging Face hub -> `demucs.hf.load_safetensors_model`;
- a `.yaml` bag of models, or a directory holding one (next to its `.th` files) -> demucs' `LocalRepo`;
- a model name ("htdemucs", or "hf://[namespace/]name") -> the files `demucs.pretrained.get_model` would fetch,
  taken only from the local Hugging Face cache (demucs >= 4.1) or the torch hub cache (`<hub dir>/checkpoints`).
Anything else raises `MissingWeightsError` naming the config setting to change.
demucs (and huggingface_hub) are imported inside the functions that use them: they take seconds to import, and
the modules that reference this one (the preprocessing graph, the tests) need them only when a model loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np
import torch
import yaml

from modeling.pretrained.errors import missing

if TYPE_CHECKING:
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs

HINT = "a .th saved by demucs, a .yaml bag of models next to its .th files, or a directory holding them"


def _from_hf_cache(name: str):
    """The bag `demucs.hf.get_hf_model(name)` returns, if all its files are in the local Hugging Face cache."""
    from demucs.apply import BagOfModels  # here: see the module docstring
    from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name, load_safetensors_model
    from huggingface_hub import try_to_load_from_cache

    namespace, short = name.split("/", 1) if "/" in name else (DEFAULT_NAMESPACE, name)
    repo_id = f"{namespace}/{hf_repo_name(short)}"
    bag_file = try_to_load_from_cache(repo_id, f"{short}.yaml")
    if not isinstance(bag_file, str):
        return None
    bag = yaml.safe_load(Path(bag_file).read_text())
    files = [try_to_load_from_cache(repo_id, f"{sig}.safetensors") for sig in bag["models"]]
    if not all(isinstance(f, str) for f in files):
        return None
    return BagOfModels([load_safetensors_model(f) for f in files], bag.get("weights"), bag.get("segment"))


def _from_torch_hub_cache(name: str):
    """The model `demucs.pretrained.get_model(name)` builds from the legacy remote repo, if its files are cached."""
    from demucs.pretrained import REMOTE_ROOT, _parse_remote_files  # here: see the module docstring
    from demucs.repo import AnyModelRepo, BagOnlyRepo, RemoteRepo

    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")  # signature -> url
    bag_file = REMOTE_ROOT / f"{name}.yaml"
    if name in urls:
        sigs = [name]
    elif bag_file.is_file():
        sigs = yaml.safe_load(bag_file.read_text())["models"]
    else:
        return None
    # torch.hub.load_state_dict_from_url reads <hub dir>/checkpoints/<url basename> when present.
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if not all((cache / os.path.basename(urlparse(urls[s]).path)).is_file() for s in sigs):
        return None
    model_repo = RemoteRepo(urls)
    return AnyModelRepo(model_repo, BagOnlyRepo(REMOTE_ROOT, model_repo)).get_model(name)


def _from_dir(root: Path, name: str | None, setting: str):
    from demucs.pretrained import get_model  # here: see the module docstring

    bags, sigs = sorted(root.glob("*.yaml")), sorted(root.glob("*.th"))
    if name is None:
        candidates = bags or sigs
        if len(candidates) != 1:
            raise missing(f"a single demucs model ({len(candidates)} found)", root, setting, HINT)
        name = candidates[0].stem.split("-", 1)[0]  # "<sig>-<checksum>.th" is known by its signature
    return get_model(name, repo=root)


def load_separator(
    path_or_name: str | Path = "htdemucs", device: str | torch.device = "cpu", setting: str = "preprocess.separator"
) -> HTDemucs | BagOfModels:
    """Load a demucs source separator in eval mode (see the module docstring for what `path_or_name` may be).

    Args:
        path_or_name: a file or directory path, or a demucs model name resolved from local caches only.
        device: where the model runs.
        setting: the config key that names this model, quoted in the error when the weights are missing.
    """
    from demucs.hf import load_safetensors_model  # here: see the module docstring
    from demucs.states import load_model

    spec = str(path_or_name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        model = load_safetensors_model(path)
    elif path.is_file() and path.suffix == ".yaml":
        model = _from_dir(path.parent, path.stem, setting)
    elif path.is_file():
        model = load_model(path)
    elif path.is_dir():
        model = _from_dir(path, None, setting)
    elif spec.startswith("hf://"):  # demucs' spelling for "[namespace/]name on the Hugging Face hub only"
        model = _from_hf_cache(spec.removeprefix("hf://"))
    elif path.suffix or os.sep in spec:
        raise missing("demucs weights", path, setting, HINT)
    else:
        model = _from_hf_cache(spec) or _from_torch_hub_cache(spec)
    if model is None:
        from huggingface_hub import constants  # here: see the module docstring

        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if not spec.startswith("hf://"):
            where += f" or the torch hub cache ({Path(torch.hub.get_dir()) / 'checkpoints'})"
        raise missing(f"demucs model {spec!r}", where, setting, HINT)
    return model.to(device).eval()


def remove_vocals(
    model: HTDemucs | BagOfModels,
    audio: np.ndarray,
    device: str | torch.device | None = None,
    segment: float | None = None,
    shifts: int = 1,
    sample_rate: int = 44100,
) -> np.ndarray:
    """Separate a clip and sum every source but vocals (drums + bass + other for htdemucs), downmixed to mono.

    Follows demucs' own `Separator.separate_tensor` + `--two-stems vocals` ("add" method): normalise by the mix's
    mean / std, `apply_model` with 25% overlapping segments, undo the normalisation per source, then add the
    non-vocal sources. The model sees the channels as they are (HTDemucs was trained on stereo, where the
    position of a voice in the stereo field helps to separate it); a mono clip goes in as dual mono.

    Args:
        audio: (T,) mono, or (T, C) with C = 1 or the model's channel count (2), at `sample_rate`, which must be
            the model's.
        device: where the model runs (default: where its weights are); the full clip stays on the CPU.
        segment: seconds per separated chunk (default: the model's own, 7.8 s for htdemucs).
        shifts: random time shifts averaged over; 1 is demucs' default, 0 makes the result deterministic.
    Returns:
        float32 (T,) mono accompaniment (the mean of the output channels).
    """
    from demucs.apply import apply_model  # here: see the module docstring

    if sample_rate != model.samplerate:
        raise ValueError(
            f"audio is at {sample_rate} Hz but the separator expects {model.samplerate} Hz: resample first"
        )
    if "vocals" not in model.sources:
        raise ValueError(f"separator has no 'vocals' source (sources: {model.sources})")
    if device is None:
        device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(audio), dtype=torch.float32)
    if x.ndim == 1:
        x = x[:, None]  # (T, 1)
    if x.ndim != 2 or x.shape[1] not in (1, model.audio_channels):
        raise ValueError(f"expected audio of shape (T,), (T, 1) or (T, {model.audio_channels}), got {tuple(x.shape)}")
    wav = x.T.expand(model.audio_channels, -1)  # (C, T): a mono clip duplicated to the model's channels
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    out = apply_model(
        model,
        ((wav - mean) / std)[None],
        shifts=shifts,
        split=True,
        overlap=0.25,
        progress=False,
        device=device,
        segment=segment,
    )[0]  # (S, C, T)
    out = out * std + mean
    keep = [i for i, s in enumerate(model.sources) if s != "vocals"]
    return out[keep].sum(0).mean(0).cpu().numpy().astype(np.float32)
