"""FAD (Fréchet Audio Distance): how far the generated audio's embedding distribution is from the references'.

Gaussians are fitted (mean, unbiased covariance) to the per-frame embeddings of all generated clips and of all
reference clips, and their Fréchet distance |mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)) is computed by
`torchaudio.functional.frechet_distance`, in float64.

Embedders (`eval.fad_embedder`):
- `vggish` (default; audiocraft, which runs Google's TensorFlow FAD): VGGish through `torchvggish`, audio mono at
  16 kHz, peak-normalised to -1 dBFS (audiocraft writes its FAD files that way), log-mel examples of 0.96 s every
  0.5 s (Google's FAD step; VGGish's own framing hops 0.96 s), the 128-d embedding before PCA / quantisation and
  without the final ReLU (Google's VGGish ends in a linear layer; the torch port adds a ReLU). A torch VGGish is
  close to Google's TensorFlow one, not identical: these FADs compare with each other, and only approximately
  with published numbers (frechet-audio-distance reports 12.74 against Google's 12.44 on the same files).
- `clap`: the CLAP audio embedding of each clip (one 10 s window at 48 kHz, eval/clap.py), fadtk's
  `clap-laion-music` idea at no extra model cost. With fewer clips than embedding dimensions (512) its
  covariances are rank-deficient: use it to compare runs on the same eval set, not as an absolute number.

VGGish weights are the torchvggish release (`vggish-10086976.pth`, a plain state dict). `eval.vggish` names a
local file, or the id `vggish`, which resolves to where torchvggish caches it
(`$TORCH_HOME/hub/checkpoints/vggish-10086976.pth`); nothing is downloaded; a miss raises `MissingWeightsError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torchaudio.functional as AF

from eval.audio import peak_normalize, prepare
from modeling.pretrained.errors import weights_file

DEFAULT_VGGISH = "vggish"
VGGISH_CHECKPOINTS = {"vggish": "vggish-10086976.pth"}
VGGISH_SAMPLE_RATE = 16_000
HOP_SECONDS = 0.5  # Google's FAD steps its 0.96 s VGGish window by 0.5 s
PEAK_HEADROOM_DB = 1.0  # audiocraft's audio_write(strategy="peak") before its FAD


def frechet_distance(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets.

    Args:
        x, y: (N, D) and (M, D) embeddings (one row per frame or clip); N, M >= 2.
    """
    x, y = torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"frechet_distance needs (N, D) and (M, D) embeddings; got {tuple(x.shape)}, {tuple(y.shape)}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"a covariance needs at least 2 embeddings per set; got {len(x)} and {len(y)}")
    # rows are observations; unbiased (N - 1) covariances, as Google's FAD (np.cov) and fadtk
    mu_x, sigma_x = x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    mu_y, sigma_y = y.mean(0), torch.cov(y.T).reshape(y.shape[1], y.shape[1])
    return float(AF.frechet_distance(mu_x, sigma_x, mu_y, sigma_y))


def vggish_cache_path(model_id: str) -> Path:
    """Where torchvggish (torch.hub's download cache) keeps the VGGish weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGGISH_CHECKPOINTS[model_id]


def vggish_file(path_or_id: str | Path, setting: str = "eval.vggish") -> Path:
    """The VGGish state dict file to load; raises `MissingWeightsError` naming `setting` when there is none."""
    return weights_file(
        path_or_id,
        "VGGish weights",
        setting,
        "path to a torchvggish .pth state dict",
        cached=lambda spec: vggish_cache_path(spec) if spec in VGGISH_CHECKPOINTS else None,
    )


class Vggish:
    """VGGish (torchvggish) as Google's FAD uses it: 128-d pre-PCA embeddings, no final ReLU, 0.5 s hop.

    Args:
        path_or_id: a torchvggish state dict (`.pth`), or `vggish` resolved from the torch hub cache.
        device: where the model runs.
        setting: the config key that names this model, quoted in the error when the weights are missing.
    """

    def __init__(
        self, path_or_id: str | Path = DEFAULT_VGGISH, device: str | torch.device = "cpu", setting: str = "eval.vggish"
    ):
        from torchvggish.torchvggish import VGG, make_layers  # here: pulls resampy / numba in (seconds)

        path = vggish_file(path_or_id, setting)
        model = VGG(make_layers(), postprocess=False)  # postprocess=True would fetch the PCA parameters
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # Google's VGGish ends in a linear fc2; the torch port appends a ReLU. Its parameters keep their names.
        model.embeddings = torch.nn.Sequential(*list(model.embeddings)[:-1])
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.sample_rate = VGGISH_SAMPLE_RATE

    def examples(self, clip: np.ndarray) -> np.ndarray:
        """Log-mel examples of one 16 kHz mono clip: (n, 96, 64), 0.96 s each, every 0.5 s (none under 0.96 s)."""
        from torchvggish import mel_features
        from torchvggish import vggish_params as p

        log_mel = mel_features.log_mel_spectrogram(
            clip,
            audio_sample_rate=p.SAMPLE_RATE,
            log_offset=p.LOG_OFFSET,
            window_length_secs=p.STFT_WINDOW_LENGTH_SECONDS,
            hop_length_secs=p.STFT_HOP_LENGTH_SECONDS,
            num_mel_bins=p.NUM_MEL_BINS,
            lower_edge_hertz=p.MEL_MIN_HZ,
            upper_edge_hertz=p.MEL_MAX_HZ,
        )  # (frames, 64), one frame per 10 ms
        frames_per_s = 1.0 / p.STFT_HOP_LENGTH_SECONDS
        window = int(round(p.EXAMPLE_WINDOW_SECONDS * frames_per_s))  # 96
        hop = int(round(HOP_SECONDS * frames_per_s))  # 50
        if len(log_mel) < window:
            return np.zeros((0, window, log_mel.shape[1]), dtype=np.float32)
        return mel_features.frame(log_mel, window_length=window, hop_length=hop).astype(np.float32)

    @torch.inference_mode()
    def embed(self, audio: np.ndarray | torch.Tensor, sample_rate: int, batch_size: int | None = None) -> torch.Tensor:
        """Per-example embeddings of every clip, pooled: float32 (sum of examples, 128) on the CPU.

        Args:
            audio: (T,), (B, T) or (B, C, T) at `sample_rate`.
            batch_size: clips per forward pass (None: all at once).
        """
        x = peak_normalize(prepare(audio, sample_rate, VGGISH_SAMPLE_RATE), PEAK_HEADROOM_DB)  # (B, T) at 16 kHz
        out = []
        for chunk in torch.split(x, batch_size or max(len(x), 1)):
            examples = np.concatenate([self.examples(clip.double().numpy()) for clip in chunk])  # (n, 96, 64)
            if len(examples):
                batch = torch.from_numpy(examples)[:, None].to(self.device)  # (n, 1, 96, 64)
                out.append(self.model(batch).float().cpu())  # (n, 128)
        return torch.cat(out) if out else torch.zeros(0, 128)


class Embedder(Protocol):
    """What FAD needs of a model: audio clips -> one row per frame (VGGish) or per clip (CLAP)."""

    def __call__(self, audio: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor: ...


def fad_embedder(kind: Literal["vggish", "clap"], *, vggish=None, clap=None, batch_size: int | None = None) -> Embedder:
    """The embedding function of `eval.fad_embedder`, from an already loaded `Vggish` or `Clap`."""
    if kind == "vggish":
        if vggish is None:
            raise ValueError("eval.fad_embedder is 'vggish' but no VGGish model was given")
        return lambda audio, sample_rate: vggish.embed(audio, sample_rate, batch_size)
    if kind == "clap":
        if clap is None:
            raise ValueError("eval.fad_embedder is 'clap' but no CLAP model was given")
        return lambda audio, sample_rate: clap.embed_audio(audio, sample_rate, batch_size)
    raise ValueError(f"eval.fad_embedder must be 'vggish' or 'clap'; got {kind!r}")


def fad(
    embedder: Embedder,
    generated: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    sample_rate: int,
) -> float:
    """FAD between a set of generated clips and a set of reference clips (the sets need not be paired)."""
    return frechet_distance(embedder(generated, sample_rate), embedder(reference, sample_rate))
