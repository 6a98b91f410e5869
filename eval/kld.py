"""KLD: how far the generated audio's AudioSet label distribution is from its reference's (semantic similarity).

As audiocraft's `PasstKLDivergenceMetric`, with the classifier it uses: PaSST-S (`passt_s_swa_p16_128_ap476`,
hear21passt, AudioSet mAP .476), in logits mode over the 527 AudioSet labels:

- audio: mono, resampled to 32 kHz, split into consecutive 10 s segments (PaSST's training length); a last
  segment of 0.15 s or less is dropped; nothing is padded;
- each segment's label distribution is the softmax of PaSST's logits; segment j of a generated clip is paired
  with segment j of its reference (for 10 s clips: one pair per caption);
- `kld` is KL(reference || generated) = sum_k p_ref,k (log p_ref,k - log(p_gen,k + 1e-6)) per pair, averaged
  over pairs: audiocraft's `kld` (its `kld_pq`). `kld_reverse` is KL(generated || reference) (audiocraft's
  `kld_qp`): some toolkits report that direction, so both are returned and logged under their own names.

The checkpoint is PaSST's own release format: the network's state dict (`torch.save(net.state_dict())`), loaded
into a model built with `pretrained=False`, so nothing is downloaded. `eval.passt` names it: a local file, or the
id `passt_s_swa_p16_128_ap476`, which resolves to the file hear21passt itself would cache
(`$TORCH_HOME/hub/checkpoints/passt-s-f128-p16-s10-ap.476-swa.pt`). A miss raises `MissingWeightsError`.
hear21passt prints model summaries and shape traces to stdout and warns on every forward: both are silenced.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.audio import prepare, split_segments
from modeling.pretrained.errors import weights_file

DEFAULT_PASST = "passt_s_swa_p16_128_ap476"
# id -> the file name hear21passt downloads it as (timm's cache keeps the URL's last component).
PASST_CHECKPOINTS = {"passt_s_swa_p16_128_ap476": "passt-s-f128-p16-s10-ap.476-swa.pt"}
SAMPLE_RATE = 32_000
SEGMENT_SECONDS = 10.0  # PaSST-S was trained on 10 s AudioSet clips
MIN_SEGMENT_SECONDS = 0.15  # audiocraft: shorter tails break the model, so they are dropped
N_LABELS = 527  # AudioSet
EPS = 1e-6  # audiocraft's epsilon inside the log of the second distribution

# PaSST-S as `get_model(arch="passt_s_swa_p16_128_ap476")` builds it: 128 mel bins x 998 frames (10 s), 16 x 16
# patches at stride 10, a distillation token, 12 x 768, 12 heads (head dim 64).
ARCH = dict(img_size=(128, 998), patch_size=16, stride=(10, 10), in_chans=1, num_classes=N_LABELS, distilled=True)
HEAD_DIM = 64
# The frontend of `hear21passt.base.get_basic_model`, which we cannot call: it downloads the weights.
MEL = dict(
    n_mels=128,
    sr=SAMPLE_RATE,
    win_length=800,
    hopsize=320,
    n_fft=1024,
    freqm=48,
    timem=192,
    htk=False,
    fmin=0.0,
    fmax=None,
    norm=1,
    fmin_aug_range=10,
    fmax_aug_range=2000,
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """hear21passt prints to stdout (model summaries, shapes on the first forward) and warns on every forward
    (deprecated stft and autocast arguments, 1000 frames vs its nominal 998): none of it is ours to act on."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"hear21passt(\.|$)")
        warnings.filterwarnings("ignore", message=r".*return_complex=False is deprecated")
        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast")
        yield


def passt_cache_path(model_id: str) -> Path:
    """Where hear21passt (timm's download cache) keeps the checkpoint of a PaSST id."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PASST_CHECKPOINTS[model_id]


def passt_file(path_or_id: str | Path, setting: str = "eval.passt") -> Path:
    """The PaSST state dict file to load; raises `MissingWeightsError` naming `setting` when there is none."""
    return weights_file(
        path_or_id,
        "PaSST weights",
        setting,
        "path to a PaSST .pt state dict",
        cached=lambda spec: passt_cache_path(spec) if spec in PASST_CHECKPOINTS else None,
    )


class Passt:
    """PaSST-S audio tagger in eval mode: audio -> AudioSet label distributions per 10 s segment.

    Args:
        path_or_id: a PaSST state dict file (`.pt`, PaSST's release format), or `passt_s_swa_p16_128_ap476`
            resolved from the torch hub cache without downloading. A state dict of another width or depth (a tiny
            test model) builds the same architecture at that size, with one head per 64 channels.
        device: where the model runs.
        setting: the config key that names this model, quoted in the error when the weights are missing.
    """

    def __init__(
        self, path_or_id: str | Path = DEFAULT_PASST, device: str | torch.device = "cpu", setting: str = "eval.passt"
    ):
        with _quiet():  # hear21passt prints at import too
            from hear21passt.models.passt import PaSST, checkpoint_filter_fn, get_model
            from hear21passt.models.preprocess import AugmentMelSTFT
            from hear21passt.wrapper import PasstBasicWrapper

        path = passt_file(path_or_id, setting)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)  # some releases wrap the state dict, as hear21passt's filter allows
        width = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        with _quiet():
            if (width, depth) == (768, 12):  # PaSST-S: the library's own builder, without its download
                net = get_model(arch=DEFAULT_PASST, pretrained=False, n_classes=N_LABELS)
            else:
                net = PaSST(**ARCH, embed_dim=width, depth=depth, num_heads=max(1, width // HEAD_DIM))
            # What hear21passt does to a downloaded checkpoint before loading it (patch-embedding layout fixes).
            net.load_state_dict(checkpoint_filter_fn(state, net))
            model = PasstBasicWrapper(mel=AugmentMelSTFT(**MEL), net=net, mode="logits")
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.sample_rate = SAMPLE_RATE

    @torch.inference_mode()
    def label_probs(
        self, audio: np.ndarray | torch.Tensor, sample_rate: int, batch_size: int | None = None
    ) -> torch.Tensor:
        """AudioSet label distributions of each 10 s segment.

        Args:
            audio: (B, T) or (B, C, T) at `sample_rate`; the clips of one call share a length, so they share a
                segmentation.
            batch_size: segments per forward pass (None: all clips' j-th segments at once). Each segment is
                classified on its own (eval mode), so the result does not depend on the batch.
        Returns:
            float32 (B, n_segments, 527) on the CPU, each row summing to 1.
        """
        x = prepare(audio, sample_rate, SAMPLE_RATE)  # (B, T) at 32 kHz
        segments = split_segments(x, int(SEGMENT_SECONDS * SAMPLE_RATE), int(MIN_SEGMENT_SECONDS * SAMPLE_RATE))
        if not segments:
            raise ValueError(f"clips of {x.shape[-1] / SAMPLE_RATE:.3f} s are too short for PaSST")
        probs = []
        for seg in segments:  # (B, L): segment j of every clip
            logits = []
            with _quiet():
                for chunk in torch.split(seg, batch_size or max(len(seg), 1)):
                    logits.append(self.model(chunk.to(self.device)).float().cpu())  # (b, 527)
            probs.append(torch.softmax(torch.cat(logits), dim=-1))
        return torch.stack(probs, dim=1)  # (B, n_segments, 527)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """KL(p || q) per row over the last axis: sum_k p_k (log p_k - log(q_k + eps)), with 0 log 0 = 0.

    audiocraft's `kl_divergence(pred_probs=q, target_probs=p)`: the epsilon guards the log of q only.
    """
    p, q = p.double(), q.double()
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q + eps)).sum(-1)  # xlogy(0, .) = 0


@dataclass
class KLD:
    kld: float  # mean KL(reference || generated): audiocraft's `kld`
    kld_reverse: float  # mean KL(generated || reference): audiocraft's `kld_qp`
    per_pair: np.ndarray  # (pairs,) KL(reference || generated) of each (generated, reference) segment pair
    per_pair_reverse: np.ndarray  # (pairs,) KL(generated || reference)


def kld(p_reference: torch.Tensor, p_generated: torch.Tensor) -> KLD:
    """Both KL directions between paired label distributions, averaged over pairs.

    Args:
        p_reference, p_generated: (..., n_labels) distributions, row i of one paired with row i of the other
            (e.g. `Passt.label_probs` of the references and of the clips generated from their captions).
    """
    if p_reference.shape != p_generated.shape:
        raise ValueError(
            f"kld pairs reference and generated distributions one to one; got shapes {tuple(p_reference.shape)} "
            f"and {tuple(p_generated.shape)} (clips of different lengths?)"
        )
    ref = p_reference.reshape(-1, p_reference.shape[-1])
    gen = p_generated.reshape(-1, p_generated.shape[-1])
    if not len(ref):
        raise ValueError("kld needs at least one pair")
    forward, reverse = kl_divergence(ref, gen), kl_divergence(gen, ref)
    return KLD(float(forward.mean()), float(reverse.mean()), forward.numpy(), reverse.numpy())


def passt_kld(
    passt: Passt,
    generated: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    sample_rate: int,
    batch_size: int | None = None,
) -> KLD:
    """KLD of generated clips against their references (clip i generated from reference i's caption).

    Both are (B, T) or (B, C, T) at `sample_rate` and of the same length (e.g. both cut to `eval.seconds`).
    """
    return kld(
        passt.label_probs(reference, sample_rate, batch_size), passt.label_probs(generated, sample_rate, batch_size)
    )
