import json
from pathlib import Path

import pytest
import yaml

from pretrain.cli import build_parser, main
from pretrain.config import ConfigError, flatten, load_config, save_resolved


def test_tiny_config_loads_with_derived_paths(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    assert cfg.model.head == "continuous"
    assert str(cfg.data_dir).endswith("runs/tiny/data")
    assert str(cfg.run_dir).endswith("runs/tiny/runs/run")


def test_base_config_is_valid(repo_root):
    cfg = load_config(repo_root / "configs" / "base.yaml")
    assert cfg.train.precision == "bf16" and cfg.model.d_model == 1024


def test_dotted_overrides_are_typed(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["train.lr=3e-4", "model.head=softmax", "data.corpus=[a, b]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.head == "softmax"
    assert cfg.data.corpus == ["a", "b"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=1", "train.lrr"),
        ("train.steps=abc", "train.steps"),
        ("model.head=sigmoid", "model.head"),
        ("train.steps=-3", "train.steps"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("tracking.enabled=maybe", "tracking.enabled"),
    ],
)
def test_bad_keys_and_types_name_the_key(repo_root, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs" / "tiny.yaml", [override])
    assert key in str(err.value)


def test_cross_check_pipeline_with_zero3(repo_root):
    with pytest.raises(ConfigError, match="pipeline_stages"):
        load_config(repo_root / "configs" / "tiny.yaml", ["train.zero_stage=3", "train.pipeline_stages=2"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_resolved_config_round_trips(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["train.steps=7"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg and again.train.steps == 7
    assert flatten(yaml.safe_load(path.read_text()))["train.steps"] == 7


def test_cli_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, _ in build_parser()._subparsers._group_actions[0].choices.items():
        assert name in out


def test_overrides_may_follow_the_options(monkeypatch, repo_root):
    seen = {}

    def fake_run(args):
        from pretrain.commands._common import config_from_args

        seen["cfg"], seen["run_dir"] = config_from_args(args), args.run_dir
        return 0

    parser_args = ["eval", str(repo_root / "configs" / "tiny.yaml"), "--run-dir", "R", "eval.topk=7", "train.lr=3e-4"]
    import pretrain.commands.eval as eval_cmd

    monkeypatch.setattr(eval_cmd, "run", fake_run)
    assert main(parser_args) == 0
    assert seen["cfg"].eval.topk == 7 and seen["cfg"].train.lr == pytest.approx(3e-4) and seen["run_dir"] == "R"
    with pytest.raises(SystemExit):
        main(["eval", "--run-dir", "R", "--no-such-flag"])


def test_shipped_paths_resolve_from_anywhere(tmp_path, monkeypatch, repo_root):
    from pretrain.config import resolve_shipped_path

    monkeypatch.chdir(tmp_path)
    assert resolve_shipped_path("data/finetune/train.jsonl") == repo_root / "data/finetune/train.jsonl"
    (tmp_path / "data" / "finetune").mkdir(parents=True)
    (tmp_path / "data" / "finetune" / "train.jsonl").write_text("{}\n")
    assert resolve_shipped_path("data/finetune/train.jsonl") == Path("data/finetune/train.jsonl")  # the local file wins
    assert resolve_shipped_path("nowhere.jsonl") == Path("nowhere.jsonl")  # the error will name it as given


@pytest.mark.parametrize("name", ["", ".", "..", "../../..", "a/b", "runs\\x"])
def test_run_name_must_be_one_directory_name(repo_root, name):
    with pytest.raises(ConfigError, match=r"train\.run_name: .*must be one directory name .*train\.run_dir"):
        load_config(repo_root / "configs" / "tiny.yaml", [f"train.run_name={json.dumps(name)}"])
    assert load_config(repo_root / "configs" / "tiny.yaml", ["train.run_name=exp-1.b"]).run_dir.name == "exp-1.b"
