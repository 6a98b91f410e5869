"""`simba-ttm info --config FILE [key=value ...] [--json | --print-config]`: what a configured model costs,
without building it, or the config it resolves to."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from configs import ConfigError, load_config
from modeling.summary import TYPICAL_TEXT_LEN, summarize
from ray_jobs.common import add_config_args, fail


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simba-ttm info", description=__doc__)
    add_config_args(parser, "model.arch=transformer")
    parser.add_argument("--text-len", type=int, default=TYPICAL_TEXT_LEN, help="caption length in T5 tokens")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the numbers")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (base, overrides applied) as YAML"
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    if args.text_len < 0:
        return fail("simba-ttm info", f"--text-len is a caption length in T5 tokens, at least 0; got {args.text_len}")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        return fail("simba-ttm info", err)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None), end="")
        return 0
    s = summarize(cfg, text_len=args.text_len)
    t = cfg.train
    hybrid = f" (attention layers {list(cfg.model.attn_layers)})" if cfg.model.attn_layers else ""
    kernels = " (with mamba_ssm's kernels; the pure-PyTorch path keeps far more)" if s.arch == "simba" else ""
    rows = [
        ("experiment", cfg.name),
        ("architecture", s.arch + hybrid),
        ("parameters", f"{s.params:,} ({s.params / 1e6:.1f}M)"),
        (
            "sequence length",
            f"{s.seq_len} tokens"
            + (
                f" (text prefix {args.text_len} included)"
                if s.arch == "simba"
                else " (the caption enters through cross-attention)"
            ),
        ),
        ("FLOPs/token forward", f"{s.flops_per_token_forward / 1e9:.3f} GFLOP"),
        ("FLOPs/token train", f"{s.flops_per_token_train / 1e9:.3f} GFLOP (3x forward)"),
        ("train memory (est.)", f"{_gib(s.train_memory_bytes_estimate)} at micro-batch {t.batch_size}" + kernels),
        ("inference cache", f"{s.cache_bytes_per_sample / 2**20:.1f} MiB per sample for {s.generation_frames} frames"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.json:
        print(json.dumps(s.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
