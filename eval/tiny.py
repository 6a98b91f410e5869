"""Tiny random stand-ins for the evaluation models, saved in each library's own format.

Tests use them, and so can the demo where the real weights are absent: each goes through the production loader
(`Clap`, `Passt`). They keep the interfaces that matter: CLAP's 48 kHz / 10 s feature extractor (64 mel bins,
HTSAT's 256 x 256 spectrogram image) and a Roberta-style tokenizer (`<s> ... </s>`, pad id 1); PaSST's 32 kHz
mel frontend, 10 s patch grid and 527 AudioSet logits. Their numbers are random-weight noise, not measurements.
VGGish has no small variant (torchvggish builds one fixed architecture, 72M parameters, ~290 MB saved): use
`eval.fad_embedder: clap` with these, or a random full-size VGGish where its size does not matter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modeling.pretrained.tiny import PUNCTUATION, SEED, WORDS, write_atomically


def tiny_clap_tokenizer(max_length: int = 77):
    """A word-level Roberta-style tokenizer over the caption words: `<s> words </s>`, `<pad>` (id 1) on the right."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors  # here: transformers is slow to import
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<s>", "<pad>", "</s>", "<unk>", *WORDS, *PUNCTUATION]))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


def make_tiny_clap(dir: str | Path, dim: int = 16, seed: int = SEED) -> Path:
    """A random CLAP (2-layer text encoder, 3-stage HTSAT) with its processor, all written by `save_pretrained`."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor  # here: see above

    def write(target: Path) -> None:
        tokenizer = tiny_clap_tokenizer()
        config = ClapConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=80,  # Roberta positions start after the pad id: 77 tokens need 79
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                projection_dim=dim,
            ),
            audio_config=dict(
                patch_embeds_hidden_size=16,
                depths=[1, 1, 1],
                num_attention_heads=[2, 2, 2],
                hidden_size=64,  # 16 channels doubled at each of the 2 merges
                projection_dim=dim,
            ),
            projection_dim=dim,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = ClapModel(config)
        model.save_pretrained(target)
        # The real checkpoint's feature extractor settings: 48 kHz, 10 s, 64 mel bins, hop 480.
        ClapProcessor(feature_extractor=ClapFeatureExtractor(), tokenizer=tokenizer).save_pretrained(target)

    return write_atomically(Path(dir), write)


def make_tiny_passt(path: str | Path, width: int = 64, depth: int = 2, seed: int = SEED) -> Path:
    """A random PaSST with PaSST-S's frontend, patch grid and 527 labels at width 64 x depth 2, as a state dict."""
    from eval.kld import ARCH, HEAD_DIM, _quiet

    with _quiet():
        from hear21passt.models.passt import PaSST

    def write(target: Path) -> None:
        with torch.random.fork_rng(), _quiet():
            torch.manual_seed(seed)
            net = PaSST(**ARCH, embed_dim=width, depth=depth, num_heads=max(1, width // HEAD_DIM))
        torch.save(net.state_dict(), target)  # PaSST's release format: the network's state dict

    return write_atomically(Path(path), write)


def make_tiny_eval_models(dir: str | Path) -> dict[str, str]:
    """Tiny CLAP and PaSST under `dir`, reusing any already there. Returns paths keyed like the eval config."""
    root = Path(dir)
    paths = {"clap": root / "clap_tiny", "passt": root / "passt_tiny.pt"}
    makers = {"clap": make_tiny_clap, "passt": make_tiny_passt}
    for key, path in paths.items():
        if not path.exists():
            makers[key](path)
    return {key: str(path) for key, path in paths.items()}
