"""Configs: every shipped YAML loads, defaults are the paper's, overrides and errors behave."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from configs import (
    CONFIG_DIR,
    DEFAULT_TRACKING_URI,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    GenerationConfig,
    MLflowConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from configs.loading import load_file, resolve_config_path

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))
SECTIONS = ("model", "data", "preprocess", "train", "generation", "mlflow", "eval", "tune")


def _schema_keys() -> dict[str, set[str]]:
    cfg = ExperimentConfig()
    return {s: {f.name for f in dataclasses.fields(getattr(cfg, s))} for s in SECTIONS}


def test_shipped_configs_exist():
    assert {"paper", "debug"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == path.stem
    assert load_config(path.stem) == cfg  # a bare name resolves to configs/<name>.yaml


def test_paper_yaml_spells_out_every_field():
    """The root config documents every key; the others inherit from it and list only what differs."""
    raw = yaml.safe_load((CONFIG_DIR / "paper.yaml").read_text())
    assert set(raw) == {"name", *SECTIONS}
    for section, keys in _schema_keys().items():
        assert set(raw[section]) == keys, f"paper.yaml [{section}] differs from the schema"


INHERITING = [p for p in SHIPPED if "base" in yaml.safe_load(p.read_text())]


def test_debug_and_small_inherit():
    assert {"debug", "small"} <= {p.stem for p in INHERITING}


@pytest.mark.parametrize("path", INHERITING, ids=lambda p: p.name)
def test_inheriting_configs_list_only_differences(path):
    raw = yaml.safe_load(path.read_text())
    base = load_file(resolve_config_path(raw["base"], relative_to=path.parent))
    own = load_file(path)
    for section, values in raw.items():
        if section in ("base", "name"):
            continue
        assert values, f"{path.name}: empty section {section!r}"
        for key in values:
            assert own[section][key] != base[section][key], f"{path.name}: {section}.{key} repeats its base's value"
    # and what it does not list is its base's
    cfg, base_cfg = load_config(path), ExperimentConfig.from_dict(base)
    for section in SECTIONS:
        for key in _schema_keys()[section]:
            if key not in raw.get(section, {}):
                assert getattr(getattr(cfg, section), key) == getattr(getattr(base_cfg, section), key)


def test_defaults_are_the_paper_yaml():
    paper = load_config(CONFIG_DIR / "paper.yaml")
    default = ExperimentConfig()
    for section in SECTIONS:
        assert getattr(paper, section) == getattr(default, section), section
    assert load_config(None) == default


def test_paper_values():
    cfg = load_config("paper")
    m, d, t, g = cfg.model, cfg.data, cfg.train, cfg.generation
    assert (m.arch, m.n_layers, m.d_model, m.d_state, m.dropout) == ("simba", 24, 1024, 512, 0.3)
    assert (m.vocab_size, m.pad_id, m.text_dim, m.mlp_dim, m.n_heads) == (1025, 1024, 768, 2048, 16)
    assert (m.d_conv, m.expand, m.headdim, m.attn_layers) == (4, 2, 64, [])
    assert (d.max_frames, d.codebook, d.frame_rate) == (2588, 0, 44100 / 512)
    assert (t.batch_size, t.grad_accum, t.effective_batch_size) == (4, 32, 128)
    assert (t.lr, t.weight_decay, t.betas, t.eps) == (1e-4, 0.02, (0.9, 0.999), 1e-7)
    assert (t.warmup_steps, t.min_lr_ratio, t.label_smoothing, t.grad_clip) == (100, 0.005, 0.1, 1.0)
    assert (t.checkpoint_every, t.num_workers, t.use_gpu) == (500, 1, True)
    assert (g.top_k, g.cfg_scale, g.seconds) == (250, 3.0, 10.0)
    assert type(t.lr) is float and type(t.betas) is tuple


def test_eval_section():
    e = load_config("paper").eval
    assert (e.clap, e.passt, e.vggish) == ("laion/larger_clap_music", "passt_s_swa_p16_128_ap476", "vggish")
    assert (e.fad_embedder, e.seconds, e.limit) == ("vggish", 10.0, None)
    debug = load_config("debug")
    assert debug.eval.seconds == debug.generation.seconds and debug.eval.fad_embedder == "clap"
    assert load_config("paper", ["eval.limit=16"]).eval.limit == 16
    for bad, message in [
        ({"limit": 0}, r"eval.limit must be null \(all\) or >= 1"),
        ({"fad_embedder": "pann"}, "eval.fad_embedder must be one of 'vggish', 'clap'"),
        ({"seconds": 0.0}, "eval.seconds must be > 0"),
        ({"clap": ""}, "eval.clap must be a non-empty string"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig.from_dict({"eval": bad})


def test_debug_is_tiny_and_cpu_only():
    cfg = load_config("debug")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.text_dim) == (64, 2, 32)
    assert (cfg.train.use_gpu, cfg.train.precision, cfg.train.max_steps) == (False, "fp32", 60)
    assert cfg.generation.n_frames(cfg.data.frame_rate) <= cfg.data.max_frames


def test_overrides():
    cfg = load_config(
        "paper",
        [
            "model.n_layers=12",
            "train.lr=3e-4",  # PyYAML reads 3e-4 as a string; float fields accept it
            "model.attn_layers=[3,7]",
            "train.precision=bf16",
            "train.betas=[0.8, 0.99]",
            "mlflow.tracking_uri=sqlite:///other.db",
            "name=foo",
            "train.max_steps=1e3",  # an integral float is a fine int
        ],
    )
    assert cfg.model.n_layers == 12
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float
    assert cfg.model.attn_layers == [3, 7]
    assert cfg.train.precision == "bf16"
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.mlflow.tracking_uri == "sqlite:///other.db"
    assert cfg.name == "foo"
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    assert cfg.model.d_model == 1024  # untouched keys keep the file's values
    assert load_config("debug", ["model.arch=transformer"]).model.arch == "transformer"
    assert load_config(None, ["train.grad_accum=8"]).train.grad_accum == 8


def test_numeric_strings_in_yaml_files(tmp_path):
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}  # the YAML 1.1 quirk the schema must absorb
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lr: 1e-4\n  eps: 1e-8\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.eps) == (1e-4, 1e-8)


def test_unknown_key_names_it_lists_valid_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config("paper", ["model.d_stat=3"])
    msg = str(err.value)
    assert "unknown key 'model.d_stat'" in msg
    valid = ", ".join(sorted(_schema_keys()["model"]))
    assert f"valid keys: {valid}" in msg
    assert msg.startswith("override 'model.d_stat=3': unknown key 'model.d_stat'; valid keys: arch, attn_layers,")
    assert msg.endswith("(did you mean 'model.d_state'?)")
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict({"model": {"d_stat": 3}})
    assert str(err.value) == f"unknown key 'model.d_stat'; valid keys: {valid} (did you mean 'model.d_state'?)"


def test_unknown_section_and_key_in_file(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'modle'; valid keys: data, eval, generation, mlflow, model, name, "
        r"preprocess, train, tune \(did you mean 'model'\?\)",
    ):
        load_config(None, ["modle.d_model=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rate'; valid keys: batch_size, betas"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.d_state=abc", "model.d_state expects int, got 'abc'"),
        ("model.n_layers=2.5", "model.n_layers expects int, got 2.5"),
        ("model.n_layers=true", "model.n_layers expects int, got True"),
        ("train.lr=fast", "train.lr expects float, got 'fast'"),
        ("train.lr=.inf", "train.lr expects a finite float, got inf"),
        ("train.use_gpu=1", "train.use_gpu expects bool, got 1"),
        ("model.attn_layers=[1, x]", "model.attn_layers[1] expects int, got 'x'"),
        ("model.attn_layers=3", "model.attn_layers expects list[int], got 3"),
        ("train.betas=[0.9]", "train.betas expects tuple[float, float] (2 items), got [0.9]"),
        ("mlflow.tracking_uri=[1]", "mlflow.tracking_uri expects str | None, got [1]"),
        ("name=123", "name expects str, got 123"),
        ("model=3", "model expects a mapping of ModelConfig keys, got 3"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("paper", [override])


def test_invalid_literal_lists_choices():
    with pytest.raises(ConfigError, match=re.escape("model.arch must be one of 'simba', 'transformer'; got 'mamba'")):
        load_config(None, ["model.arch=mamba"])
    with pytest.raises(ConfigError, match=re.escape("train.precision must be one of 'auto', 'bf16', 'fp32'; got")):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.attn_layers=[3, 24]"],
            "model.attn_layers[1] = 24 is out of range for model.n_layers = 24 (valid: 0..23)",
        ),
        (["model.attn_layers=[-1]"], "model.attn_layers[0] = -1 is out of range"),
        (["model.n_layers=4", "model.attn_layers=[4]"], "(valid: 0..3)"),
        (["model.attn_layers=[2, 2]"], "model.attn_layers has duplicates"),
        (["model.arch=transformer", "model.attn_layers=[1]"], "needs model.arch 'simba', got 'transformer'"),
    ],
)
def test_attn_layers_checked(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dropout=1.0"], "model.dropout must be in [0, 1), got 1.0"),
        (["model.n_heads=7"], "model.d_model (1024) must be divisible by model.n_heads (7)"),
        (["model.headdim=48"], "model.expand * model.d_model (2048) must be divisible by model.headdim (48)"),
        (["model.ngroups=3"], "must be divisible by model.ngroups (3)"),
        (["model.d_state=0"], "model.d_state must be > 0, got 0"),
        (["data.codebook=9"], "data.codebook must be in 0..8, got 9"),
        (["train.lr=0"], "train.lr must be > 0, got 0.0"),
        (["train.betas=[0.9, 1.0]"], "train.betas must be two values in [0, 1)"),
        (["train.warmup_steps=10", "train.max_steps=5"], "train.warmup_steps (10) must not exceed train.max_steps (5)"),
        (["generation.top_p=1.5"], "generation.top_p must be in [0, 1]"),
        (["name="], "name expects str, got None"),
    ],
)
def test_range_checks(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=re.escape("model.d_state expects int, got 'abc'")):
        ModelConfig(d_state="abc")
    with pytest.raises(ConfigError, match=re.escape("train.num_workers must be >= 1, got 0")):
        TrainConfig(num_workers=0)
    assert TrainConfig(betas=[0.5, 0.6]).betas == (0.5, 0.6)
    assert ExperimentConfig(model={"d_model": 64, "n_heads": 4, "headdim": 16}).model.d_model == 64
    with pytest.raises(ConfigError, match="unknown key 'model.width'"):
        ExperimentConfig(model={"width": 64})


@pytest.mark.parametrize("base", [None, "paper"])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("train.lr", "override 'train.lr' must look like section.key=value"),
        ("=3", "must look like section.key=value"),
        ("train..lr=3", "must look like section.key=value"),
        ("model.d_state.x=1", "override 'model.d_state.x=1': 'model.d_state' is a value, not a section"),
        ("train.lr=[", "override 'train.lr=[': value is not valid YAML"),
    ],
)
def test_malformed_overrides(base, bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(base, [bad])


def test_missing_file_lists_shipped_configs():
    with pytest.raises(FileNotFoundError, match="one of: .*debug.*paper"):
        load_config("no_such_config")


@pytest.mark.parametrize("name", ["paper", "debug"])
def test_round_trip(tmp_path, name):
    cfg = load_config(name, ["model.attn_layers=[1]", "train.lr=3e-4", "mlflow.tracking_uri=file:///tmp/x"])
    as_dict = cfg.to_dict()
    assert as_dict["train"]["betas"] == [0.9, 0.999]  # plain YAML-safe types
    assert ExperimentConfig.from_dict(yaml.safe_load(yaml.safe_dump(as_dict))) == cfg
    path = cfg.dump_yaml(tmp_path / "sub" / "cfg.yaml")
    assert load_config(path) == cfg
    assert load_config(path).to_dict() == as_dict


def test_flatten():
    cfg = load_config("paper")
    flat = cfg.flatten()
    expected = {"name"} | {f"{s}.{k}" for s, keys in _schema_keys().items() for k in keys}
    assert set(flat) == expected
    assert flat["name"] == "paper"
    assert flat["model.d_state"] == 512
    assert flat["train.lr"] == 1e-4
    assert flat["train.betas"] == [0.9, 0.999]
    assert flat["mlflow.tracking_uri"] is None


def test_n_frames():
    assert GenerationConfig(seconds=10.0).n_frames(44100 / 512) == 862
    assert GenerationConfig(seconds=30.0).n_frames(DataConfig().frame_rate) == 2584
    assert DataConfig().frame_rate == 86.1328125


def test_pad_id():
    assert ModelConfig().pad_id == 1024
    assert ModelConfig(vocab_size=1030).pad_id == 1029
    for too_small in (1024, 17):  # code 1023 would be the pad id, or codes past the embedding
        with pytest.raises(ConfigError, match="model.vocab_size must be >= 1025"):
            ModelConfig(vocab_size=too_small)


def test_tracking_uri_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert MLflowConfig().resolved_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert MLflowConfig().resolved_tracking_uri() == "http://mlflow:5000"
    assert MLflowConfig(tracking_uri="sqlite:///a.db").resolved_tracking_uri() == "sqlite:///a.db"


def test_preprocess_caption_source_needs_its_setting():
    with pytest.raises(ConfigError, match="preprocess.caption_file is not set"):
        load_config(None, ["preprocess.captions=file"])
    cfg = load_config(None, ["preprocess.captions=file", "preprocess.caption_file=caps.jsonl"])
    assert cfg.preprocess.caption_file == "caps.jsonl"
    with pytest.raises(ConfigError, match="preprocess.gpus_per_actor must be in"):
        load_config(None, ["preprocess.gpus_per_actor=2"])


def test_small_is_a_small_model():
    from modeling.summary import summarize

    cfg = load_config("small")
    assert (cfg.model.d_model, cfg.train.use_gpu, cfg.data.max_frames) == (512, True, 2588)
    for arch in ("simba", "transformer"):
        params = summarize(load_config("small", [f"model.arch={arch}"])).params
        assert 30e6 <= params <= 60e6, f"small {arch}: {params / 1e6:.1f}M parameters"


def test_direct_construction_rejects_bools_as_numbers():
    with pytest.raises(ConfigError, match=re.escape("train.lr expects float, got True (bool)")):
        TrainConfig(lr=True)
    with pytest.raises(ConfigError, match=re.escape("model.d_model expects int, got False (bool)")):
        ModelConfig(d_model=False)
    message = "train.betas expects tuple[float, float] (2 items), got [0.1, 0.2, 0.3]"
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(betas=[0.1, 0.2, 0.3])


def test_several_type_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.d_state=abc", "train.lr=fast"])
    assert str(err.value).splitlines() == [
        "model.d_state expects int, got 'abc' (str)",
        "train.lr expects float, got 'fast' (str)",
    ]


# --- inheritance ----------------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_relative_to_the_file_and_merged_deeply(tmp_path):
    _write(tmp_path / "a" / "parent.yaml", "name: parent\nmodel:\n  d_model: 64\n  n_heads: 4\n  headdim: 16\n")
    child = _write(tmp_path / "a" / "child.yaml", "base: parent.yaml\nmodel:\n  n_layers: 3\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(child)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers, cfg.train.lr) == (64, 4, 3, 1e-3)
    assert cfg.name == "child"  # never its base's name: Ray Train resumes runs by name
    assert cfg.model.d_state == ModelConfig().d_state  # neither file sets it: the schema default
    grandchild = _write(tmp_path / "b" / "grandchild.yaml", "base: ../a/child.yaml\nname: gc\nmodel:\n  n_layers: 5\n")
    cfg = load_config(grandchild, ["model.d_model=128"])
    assert (cfg.name, cfg.model.d_model, cfg.model.n_layers, cfg.train.lr) == ("gc", 128, 5, 1e-3)


def test_base_by_shipped_name_lists_replace_and_empty_sections_inherit(tmp_path):
    child = _write(tmp_path / "c.yaml", "base: debug\nmodel:\n  attn_layers: [1]\ntrain:\n")
    cfg = load_config(child)
    assert cfg.model.attn_layers == [1]
    assert cfg.model.d_model == 64 and cfg.train == load_config("debug").train
    again = _write(tmp_path / "d.yaml", "base: c.yaml\nmodel:\n  attn_layers: [0]\n")
    assert load_config(again).model.attn_layers == [0]  # replaced, not [1, 0]


def test_base_errors(tmp_path):
    loop_a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=re.escape("config inheritance loops: a.yaml -> b.yaml -> a.yaml")):
        load_config(loop_a)
    missing = _write(tmp_path / "m.yaml", "base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="m.yaml: base config 'nowhere.yaml' not found"):
        load_config(missing)
    bad_key = _write(tmp_path / "k.yaml", "base: paper\nmodel:\n  d_stat: 3\n")
    with pytest.raises(ConfigError, match=re.escape("unknown key 'model.d_stat'")):
        load_config(bad_key)
    bad_base = _write(tmp_path / "n.yaml", "base: [paper]\n")
    with pytest.raises(ConfigError, match="base expects a config path or name"):
        load_config(bad_base)


def test_interpolation(tmp_path):
    path = _write(tmp_path / "i.yaml", "base: debug\nmodel:\n  mlp_dim: ${model.d_model}\n")
    assert load_config(path).model.mlp_dim == 64


def test_info_prints_the_resolved_config_and_rejects_bad_keys(capsys):
    from ray_jobs import info

    assert info.main(["--config", "debug", "--print-config", "train.lr=2e-3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert ExperimentConfig.from_dict(printed) == load_config("debug", ["train.lr=2e-3"])
    assert printed["mlflow"] == load_config("paper").to_dict()["mlflow"]  # inherited, written out in full
    assert info.main(["--config", "small", "model.d_stat=3"]) == 2
    assert "did you mean 'model.d_state'?" in capsys.readouterr().err
    for arch, says in (("simba", "(text prefix 64 included)"), ("transformer", "enters through cross-attention")):
        assert info.main(["--config", "debug", f"model.arch={arch}"]) == 0
        assert says in next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sequence length"))


def test_info_refuses_a_negative_caption_length(capsys):
    from ray_jobs import info

    assert info.main(["--config", "debug", "--text-len", "-500"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "simba-ttm info: --text-len is a caption length in T5 tokens, at least 0; got -500\n"
    assert captured.out == ""  # no FLOPs or memory computed from it
    assert info.main(["--config", "debug", "--text-len", "0"]) == 0


def test_interpolation_resolves_against_the_final_config(tmp_path):
    """A reference in a base follows what a child file or an override sets, as in Hydra: resolved once, last."""
    base = _write(tmp_path / "b.yaml", "base: debug\nmodel:\n  mlp_dim: ${model.d_model}\n")
    child = _write(tmp_path / "c.yaml", "base: b.yaml\nmodel:\n  d_model: 128\n")
    assert load_config(child).model.mlp_dim == 128
    assert load_config(base, ["model.d_model=96"]).model.mlp_dim == 96
    assert load_file(child)["model"]["mlp_dim"] == 128


def test_tune_yaml_searches_the_papers_three():
    cfg = load_config("tune")
    assert cfg.tune.space == {
        "model.dropout": ["uniform", 0.1, 0.4],
        "model.d_state": ["choice", 64, 128, 256, 512],
        "train.lr": ["loguniform", 3e-5, 3e-4],
    }
    assert (cfg.tune.scheduler, cfg.tune.metric, cfg.tune.mode) == ("asha", "val_loss", "min")
    assert cfg.tune.resources_per_trial == {"cpu": 4.0, "gpu": 1.0}
    debug = load_config("tune_debug")
    assert debug.tune.resources_per_trial["gpu"] == 0.0 and not debug.train.use_gpu
    assert debug.model.d_model == load_config("debug").model.d_model


def test_a_search_space_is_replaced_whole_not_merged(tmp_path):
    """An override or a derived file that sets tune.space searches only its dimensions (merged, the base's would
    stay); other tune keys still merge."""
    only_lr = {"train.lr": ["loguniform", 1e-4, 1e-3]}
    assert load_config("tune", ["tune.space={train.lr: [loguniform, 1e-4, 1e-3]}"]).tune.space == only_lr
    child = tmp_path / "lr_only.yaml"
    child.write_text("base: tune\ntune:\n  space:\n    train.lr: [loguniform, 1.0e-4, 1.0e-3]\n  num_samples: 3\n")
    cfg = load_config(child)
    assert cfg.tune.space == only_lr and cfg.tune.num_samples == 3
    assert cfg.tune.resources_per_trial == load_config("tune").tune.resources_per_trial  # merged as before
    assert len(load_config(child, ["tune.num_samples=5"]).tune.space) == 1  # an override elsewhere keeps it


SPACE = "tune.space={model.dropout: [uniform, 0.1, 0.4], train.lr: [loguniform, 3.0e-4, 3.0e-3]}"


@pytest.mark.parametrize(
    "space, message",
    [
        ("{model.d_stat: [choice, 8]}", "tune.space: unknown key 'model.d_stat'; valid keys: arch, "),
        ("{model.d_stat: [choice, 8]}", "(did you mean 'model.d_state'?)"),
        ("{modle.dropout: [choice, 0.1]}", "(did you mean 'model'?)"),
        ("{dropout: [choice, 0.1]}", "tune.space key 'dropout' is not a config key to search; use one of model.<key>"),
        ("{tune.seed: [choice, 1]}", "tune.space key 'tune.seed' is not a config key to search"),
        ("{model.dropout: [normal, 0.1, 0.2]}", "tune.space['model.dropout'] must be a distribution, got ['normal'"),
        ("{model.dropout: 0.3}", "tune.space['model.dropout'] must be a distribution, got 0.3; valid: [choice, v1"),
        ("{model.dropout: [uniform, 0.1]}", "tune.space['model.dropout']: uniform needs two numbers"),
        ("{model.dropout: [uniform, 0.4, 0.1]}", "uniform needs lo < hi, got ['uniform', 0.4, 0.1]"),
        ("{train.lr: [loguniform, 0.0, 0.1]}", "loguniform needs lo > 0"),
        ("{model.n_layers: [randint, 1, 2.5]}", "randint needs two ints"),
        ("{model.dropout: [choice]}", "choice needs at least one value"),
        ("{model.d_state: [uniform, 8, 64]}", "uniform draws floats, but model.d_state is int"),
        ("{model.dropout: [randint, 0, 2]}", "randint draws ints, but model.dropout is float"),
        ("{model.dropout: [uniform, 0.1, 1.5]}", "can give model.dropout = 1.5: model.dropout must be in [0, 1)"),
        ("{model.d_state: [choice, 8, abc]}", "can give model.d_state = 'abc': model.d_state expects int"),
        ("{model.arch: [grid, simba, mamba]}", "can give model.arch = 'mamba': model.arch must be one of"),
    ],
)
def test_tune_space_errors_name_the_key(space, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("debug", [f"tune.space={space}"])


def test_tune_space_values_that_clash_together_are_refused_up_front():
    """d_model 40 and headdim 32 are each valid beside debug.yaml's other settings, not together (2 * 40 % 32): a
    trial that drew both used to fail hours into the sweep. `simba-ttm tune` checks (check_sweep calls this); a
    plain load does not, so the checkpoints of an older sweep with such a space still load."""
    for alone in ("{model.d_model: [choice, 64, 40]}", "{model.headdim: [choice, 16, 32]}"):
        load_config("debug", [f"tune.space={alone}"]).check_space_combinations()
    both = "{model.d_model: [choice, 64, 40], model.headdim: [choice, 16, 32], model.dropout: [uniform, 0.1, 0.4]}"
    message = "tune.space can give model.d_model = 40, model.headdim = 32, model.dropout = 0.1 together: model.expand"
    cfg = load_config("debug", [f"tune.space={both}"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.check_space_combinations()
    load_config("debug", [both.replace("40", "48").join(("tune.space=", ""))]).check_space_combinations()  # all fit


def test_tune_section_checks():
    cfg = load_config("debug", [SPACE, "tune.search=optuna"])
    assert cfg.tune.space["train.lr"] == ["loguniform", 3e-4, 3e-3]
    for overrides, message in [
        (["tune.resources_per_trial={tpu: 1}"], "unknown resource 'tpu'; valid: cpu, gpu"),
        (["tune.resources_per_trial={cpu: 0}"], "needs cpu > 0"),
        (["tune.num_samples=0"], "tune.num_samples must be >= 1"),
        (["tune.metric=eval/clap"], "tune.metric must be one of the metrics trials report: val_loss, train_loss"),
        (["tune.reduction_factor=1"], "tune.reduction_factor must be > 1"),
        (["tune.scheduler=hyperband"], "tune.scheduler must be one of 'asha', 'none'"),
        (["tune.search=optuna", "tune.space={model.dropout: [grid, 0.1, 0.2]}"], "'optuna' cannot search"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("debug", overrides)
