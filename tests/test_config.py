from pathlib import Path

import pytest
from conftest import REPO_ROOT

from codeadapt.config import check_name, load_settings, parse_override

CONFIG = REPO_ROOT / "pipeline.toml"


def test_shipped_config_phases_extend_each_other():
    s = load_settings(CONFIG)
    assert s.phase_chain("phase7") == ["phase5", "phase6", "phase7"]
    p5, p6, p7 = (list(s.phase_sources(p)) for p in ("phase5", "phase6", "phase7"))
    assert p5 == ["svcs"]
    assert p6[:1] == p5 and len(p6) == 11
    assert p7[: len(p6)] == p6 and p7[-1] == "html"


def test_github_profile_uses_git_urls():
    s = load_settings(CONFIG, profile="github")
    srcs = s.phase_sources("phase6")
    assert srcs["flask"].url == "https://github.com/pallets/flask.git"
    assert {"svcs-di", "tdom-svcs"} <= set(s.phase_sources("phase5"))


@pytest.mark.parametrize("override, key", [
    ("limits.max_file_bytes='big'", "limits.max_file_bytes"),
    ("groups.popular.budget.colour=1", "groups.popular.budget.colour"),
    ("split.test=0.9", "split.test"),
    ("split.by_symbol=['nogroup']", "split.by_symbol"),
    ("train.iters=true", "train.iters"),  # a bool is not 1
    ("train.iters='3'", "train.iters"),
    ("unknown=1", "unknown"),
])
def test_bad_config_names_key_path(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_settings(CONFIG, overrides=[override])


def test_unknown_profile_and_missing_file(tmp_path: Path):
    with pytest.raises(ValueError, match="profile 'nope'"):
        load_settings(CONFIG, profile="nope")
    with pytest.raises(FileNotFoundError, match="nothere.toml"):
        load_settings(tmp_path / "nothere.toml")


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 80])
def test_bad_source_names_rejected(name: str, tmp_path: Path):
    with pytest.raises(ValueError, match="invalid"):
        check_name(name)
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[groups.g]\n[sources."{name}"]\nkind = "path"\npath = "x"\ngroup = "g"\n')
    with pytest.raises(ValueError, match="invalid"):
        load_settings(cfg)


def test_source_names_that_differ_only_in_case_are_a_config_error(tmp_path: Path):
    """Asserts: `Flask` and `flask` in one profile fail to load, naming both (one checkout
    directory on macOS/Windows); `flask` and `flask2` load."""
    cfg = tmp_path / "p.toml"
    src = '[sources.{}]\nkind = "path"\npath = "x"\ngroup = "g"\n'
    cfg.write_text("[groups.g]\n" + src.format("Flask") + src.format("flask"))
    with pytest.raises(ValueError, match="'Flask' and 'flask' differ only in case"):
        load_settings(cfg)
    cfg.write_text("[groups.g]\n" + src.format("flask2") + src.format("flask"))
    assert set(load_settings(cfg).active_sources()) == {"flask", "flask2"}


def test_override_values_are_toml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=hello") == ("a", "hello")
    assert parse_override('a=["x"]') == ("a", ["x"])


PHASES_TOML = """
[groups.g]
[phases.a]
groups = ["g"]
[phases.b]
extends = "a"
train_iters = 7
[train]
iters = 50
lora_rank = 4
learning_rate = 3e-4
"""


def test_phase_train_iters_override_only_the_step_count(tmp_path: Path):
    """Asserts: a phase with train_iters gets [train] with iters replaced (every other field
    equal); a phase without it gets [train] itself; a --set of train_iters works the same way;
    train_iters=0 fails naming its key path (also on the shipped config)."""
    cfg = tmp_path / "p.toml"
    cfg.write_text(PHASES_TOML)
    s = load_settings(cfg)
    spec = s.train_spec("b")
    assert (spec.iters, s.train.iters) == (7, 50)
    assert spec.model_dump(exclude={"iters"}) == s.train.model_dump(exclude={"iters"})
    assert (spec.lora_rank, spec.learning_rate) == (4, 3e-4)
    assert s.phases["a"].train_iters is None and s.train_spec("a") == s.train
    s = load_settings(cfg, overrides=["phases.a.train_iters=3"])
    assert s.train_spec("a").iters == 3 and s.train.iters == 50
    for config, key in ((cfg, "phases.a.train_iters"), (CONFIG, "phases.phase5.train_iters")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_settings(config, overrides=[f"{key}=0"])


def test_eval_max_conversations_must_be_positive(tmp_path: Path):
    """Asserts: eval.max_conversations defaults to None (all), takes a positive count, and 0
    fails naming its key path."""
    cfg = tmp_path / "p.toml"
    cfg.write_text(PHASES_TOML)
    assert load_settings(cfg).eval.max_conversations is None
    assert load_settings(cfg, overrides=["eval.max_conversations=5"]).eval.max_conversations == 5
    with pytest.raises(ValueError, match=r"eval\.max_conversations"):
        load_settings(cfg, overrides=["eval.max_conversations=0"])


def test_a_held_out_phase_must_not_feed_training():
    """Asserts: the shipped config holds out phase "base" (its sources feed no trained phase);
    holding out a phase whose sources phase7 trains on, an unknown phase, or the tiny base's
    pre-training corpus is a config error naming the key."""
    s = load_settings(CONFIG)
    assert s.eval.held_out_phase == "base" and "werkzeug" in s.held_out_sources()
    assert not set(s.held_out_sources()) & set(s.phase_sources("phase7"))
    with pytest.raises(ValueError, match=r"eval.held_out_phase 'phase5'.*also feed phase 'phase6'"):
        load_settings(CONFIG, overrides=["eval.held_out_phase='phase5'"])
    with pytest.raises(ValueError, match="unknown phase 'nope'"):
        load_settings(CONFIG, overrides=["eval.held_out_phase='nope'"])
    with pytest.raises(ValueError, match="pre-trains the tiny base"):
        load_settings(CONFIG, overrides=["base.model='tiny'"])
    assert load_settings(CONFIG, overrides=["base.model='tiny'", "eval.held_out_phase=''"]).held_out_sources() == {}


@pytest.mark.parametrize("name", ["smollm2", "SmolLM2", "smollm2-135m", "SmolLM2-135M-Instruct"])
def test_the_wheels_base_answers_to_its_short_names(name: str):
    s = load_settings(CONFIG, overrides=[f"base.model={name!r}"])
    assert s.base_model() == "smollm2-135m"


def test_an_unreachable_hub_model_names_the_model_and_the_offline_bases(tmp_path: Path, monkeypatch):
    import mlx_lm.utils

    from flows.phase import resolve_base

    def offline(name, *a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(mlx_lm.utils, "_download", offline)
    with pytest.raises(RuntimeError, match=r"'someone/some-model'.*'smollm2-135m' and 'tiny'"):
        resolve_base.fn("someone/some-model")
    assert resolve_base.fn(str(tmp_path)) == tmp_path
