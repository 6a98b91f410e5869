"""`key=value` overrides go anywhere after the job's name, before or after its flags: every job that takes them
passes each one to the config (an unknown key among them is refused by the config, exit status 2, not by argparse
as an unrecognized argument). In process, without Ray: the config is read before anything slow starts."""

from __future__ import annotations

import importlib
import inspect

import pytest
import yaml

from ray_jobs.cli import JOBS as CLI_JOBS

# job -> its arguments with a flag between two overrides (the last one an unknown key)
JOBS = {
    "train": ["--config", "debug", "name=x", "--local-mode", "bogus.key=1"],
    "tune": ["--config", "tune_debug", "name=x", "--resume", "bogus.key=1"],
    "preprocess": ["--config", "debug", "name=x", "--address", "auto", "bogus.key=1"],
    "make_evalset": ["--config", "debug", "name=x", "--address", "auto", "bogus.key=1"],
    "codebooks": ["--config", "debug", "name=x", "--limit", "1", "bogus.key=1"],
    "evaluate": ["--run", "runs/x", "--config", "debug", "name=x", "--force", "bogus.key=1"],
    "demo": ["--config", "debug", "name=x", "--tracks", "3", "bogus.key=1"],
    "info": ["--config", "debug", "name=x", "--json", "bogus.key=1"],
}


def test_every_job_with_overrides_is_checked_here():
    takes = set()
    for module, _ in CLI_JOBS.values():
        source = inspect.getsource(importlib.import_module(module))
        if "add_config_args(" in source or '"overrides"' in source:
            takes.add(module.removeprefix("ray_jobs."))
    assert takes == set(JOBS)


@pytest.mark.parametrize("job", list(JOBS))
def test_an_override_after_a_flag_reaches_the_config(job, capsys):
    assert importlib.import_module(f"ray_jobs.{job}").main(JOBS[job]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"simba-ttm {job.replace('_', '-')}: override 'bogus.key=1': unknown key 'bogus'"), err
    assert err.count("\n") == 1


def test_overrides_before_and_after_flags_all_apply(capsys):
    from ray_jobs import info

    assert info.main(["--config", "debug", "name=x", "--print-config", "train.lr=3e-3", "--json", "train.seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["name"], printed["train"]["lr"], printed["train"]["seed"]) == ("x", 3e-3, 7)
