"""Tiny random stand-ins for the pretrained parts, saved in each library's own format.

Tests use them, and so does the demo when the real weights are absent (no internet to fetch them):
each is written exactly as its library writes a real checkpoint, so it goes through the same loader as
production (`load_codec`, `TextEncoder`, `load_separator`, the model captioners). They keep the interfaces that
matter downstream: DAC's 9 codebooks x 1024 at hop 512 and 44.1 kHz, HTDemucs' four sources, a T5 encoder with
an EOS-appending tokenizer, a Qwen2-Audio with its processor and a Llama with a chat template (captions: model).
Their outputs are random-weight noise, not music (and not sense).
Each maker imports its own library (dac, transformers, demucs) inside: each takes seconds to import, and a
caller that makes one model (or none, like test collection) should not pay for all three.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import torch

SEED = 0
SOURCES = ["drums", "bass", "other", "vocals"]

# Words common in music captions, so tiny-model token counts look like real ones.
WORDS = """
a an the and or of with in on at to for from by is are this that it its very some while over into as
song track piece music tune melody rhythm beat groove tempo harmony chords chord riff loop intro outro verse
chorus bridge solo sound sounds texture atmosphere vibe feel mood style genre instrumental instruments
rock pop jazz blues classical electronic ambient folk country metal punk hip hop rap funk soul reggae disco
house techno trance dance orchestral cinematic acoustic lofi lo-fi indie experimental world latin
piano guitar electric bass drums drum kit percussion synth synthesizer strings violin cello viola
flute saxophone trumpet brass horns organ keyboard pad pads bells choir harp ukulele banjo clap claps
happy sad calm upbeat energetic relaxing dark bright mellow melancholic uplifting dreamy epic soft loud
slow fast fat heavy light warm gentle powerful peaceful emotional romantic playful aggressive chill smooth
steady driving catchy simple complex minimal repetitive layered deep high low
background film game commercial party summer night morning travel
bpm major minor key time signature four beats per minute
""".split()
PUNCTUATION = [",", ".", "-", "!", "?", "'", ":", ";", "(", ")", "&", "/"]


def write_atomically(final: Path, write) -> Path:
    """Write a file or folder with `write(tmp_path)` next to `final`, then rename it into place: concurrent makers
    never see half of one, and the first to finish wins (a folder cannot be replaced by a rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        target = tmp / final.name
        write(target)
        try:
            os.rename(target, final)
        except OSError:  # another process finished first (a non-empty directory cannot be replaced)
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_tiny_codec(path: str | Path, seed: int = SEED) -> Path:
    """A random DAC with the real model's codes (9 codebooks x 1024, hop 512, 44.1 kHz), saved by dac itself.

    encoder_dim 8 / decoder_dim 32 (0.49M parameters) encodes 30 s in ~5 s on 2 cores, about twice as fast
    as 16 / 64; the codes' shape depends only on the strides and the quantizer.
    """
    import dac  # here: see the module docstring

    def write(target: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = dac.DAC(encoder_dim=8, decoder_dim=32)
        # package=False writes {"state_dict", "metadata": {"kwargs"}}, the layout of dac's released weights.
        model.save(str(target), package=False)

    return write_atomically(Path(path), write)


def tiny_tokenizer():
    """A word-level T5-style tokenizer over WORDS: lowercases, appends </s>, pads with <pad> (id 0) on the right."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors  # here: see the module docstring
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "</s>", "<unk>", *WORDS, *PUNCTUATION]))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def make_tiny_text_encoder(dir: str | Path, dim: int = 32, seed: int = SEED) -> Path:
    """A random 2-layer T5 encoder of width `dim` and its tokenizer, both written by `save_pretrained`."""
    from transformers import T5Config, T5EncoderModel  # here: see the module docstring

    def write(target: Path) -> None:
        tokenizer = tiny_tokenizer()
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=dim,
            d_kv=8,
            d_ff=2 * dim,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    return write_atomically(Path(dir), write)


def make_tiny_separator(path: str | Path, seed: int = SEED) -> Path:
    """A random HTDemucs with htdemucs' sources, channels and segment, saved in demucs' package format.

    depth 4 (the default) with 8 channels and one transformer layer (0.36M parameters) separates 30 s in
    seconds; a shallower net is slower, as the cross-domain transformer then attends over far more positions.
    """
    from demucs.htdemucs import HTDemucs  # here: see the module docstring
    from demucs.states import get_state

    def write(target: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = HTDemucs(
                sources=SOURCES,
                audio_channels=2,
                samplerate=44100,
                segment=Fraction(39, 5),
                channels=8,
                depth=4,
                t_layers=1,
            )
        # What demucs.states.serialize_model writes, minus the training args (it needs omegaconf for those).
        args, kwargs = model._init_args_kwargs
        torch.save({"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": get_state(model, None)}, target)

    return write_atomically(Path(path), write)


def make_tiny_pretrained(dir: str | Path) -> dict[str, str]:
    """All three tiny models under `dir`, reusing any already there. Returns paths keyed like the data config."""
    root = Path(dir)
    paths = {
        "codec": root / "dac_tiny.pth",
        "text_encoder": root / "t5_tiny",
        "separator": root / "htdemucs_tiny.th",
    }
    makers = {"codec": make_tiny_codec, "text_encoder": make_tiny_text_encoder, "separator": make_tiny_separator}
    return make_missing(paths, makers)


def make_missing(paths: dict[str, Path], makers: dict) -> dict[str, str]:
    """Run makers[key](paths[key]) for each path that does not exist yet; return the paths as strings."""
    for key, path in paths.items():
        if not path.exists():
            makers[key](path)
    return {key: str(path) for key, path in paths.items()}


# Qwen2-Audio's and Llama-3's chat layouts, cut down to what the captioners send (the real models ship their own).
QWEN2_AUDIO_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_chat_tokenizer(specials: list[str], chat_template: str, *, pad: str, eos: str):
    """A word-level tokenizer over WORDS + digits + `specials` with a chat template, as a PreTrainedTokenizerFast.

    Lowercases; decodes with spaces between words. Words outside the vocabulary become <unk>, which is enough for
    prompts: the tiny models only need the shapes and the special tokens right.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers  # here: see the module docstring
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", *specials, *WORDS, *PUNCTUATION, *"0123456789", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    others = [s for s in specials if s not in (pad, eos)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token=pad, eos_token=eos, additional_special_tokens=others
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_audio_captioner(dir: str | Path, dim: int = 16, seed: int = SEED) -> Path:
    """A random Qwen2-Audio (one encoder and one decoder layer of width `dim`) with its processor: Whisper log-mel
    features (128 bins, 16 kHz) and a chat template with an audio placeholder, all written by `save_pretrained`."""
    from transformers import (  # here: see the module docstring
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    def write(target: Path) -> None:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
        tokenizer = tiny_chat_tokenizer(specials, QWEN2_AUDIO_TEMPLATE, pad="<|endoftext|>", eos="<|im_end|>")
        processor = Qwen2AudioProcessor(
            feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
            tokenizer=tokenizer,
            chat_template=QWEN2_AUDIO_TEMPLATE,
        )
        config = Qwen2AudioConfig(
            audio_config=dict(
                model_type="qwen2_audio_encoder",
                d_model=dim,
                encoder_layers=1,
                encoder_attention_heads=2,
                encoder_ffn_dim=2 * dim,
                num_mel_bins=128,
            ),
            text_config=dict(
                model_type="qwen2",
                vocab_size=len(tokenizer),
                hidden_size=dim,
                intermediate_size=2 * dim,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=1024,
            ),
            audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2AudioForConditionalGeneration(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(target)
        processor.save_pretrained(target)

    return write_atomically(Path(dir), write)


def make_tiny_rephraser(dir: str | Path, dim: int = 32, seed: int = SEED) -> Path:
    """A random 1-layer Llama causal LM of width `dim` with a Llama-3-style chat template, via `save_pretrained`."""
    from transformers import LlamaConfig, LlamaForCausalLM  # here: see the module docstring

    def write(target: Path) -> None:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tokenizer = tiny_chat_tokenizer(specials, LLAMA3_TEMPLATE, pad="<|end_of_text|>", eos="<|eot_id|>")
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    return write_atomically(Path(dir), write)


def make_tiny_captioners(dir: str | Path) -> dict[str, str]:
    """The two tiny caption models under `dir` (reusing any already there), keyed like the preprocess config."""
    root = Path(dir)
    paths = {"caption_audio_model": root / "qwen2_audio_tiny", "caption_text_model": root / "llama_tiny"}
    makers = {"caption_audio_model": make_tiny_audio_captioner, "caption_text_model": make_tiny_rephraser}
    return make_missing(paths, makers)
