"""Options: YAML + `--key value`, HF and reference-implementation names, clear errors before any model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlm2vec.config import TrainConfig
from vlm2vec.config_parse import load_config
from vlm2vec.ds_config import per_device_batch_size, resolve_ds_config
from vlm2vec.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
PAPER_SETUPS = ("qwen2_vl_2b_high", "qwen2_vl_7b_high", "llava_next_low", "llava_next_high", "phi3_5_v_4crop")

# examples/qwen2vl/run_train.sh of the reference implementation (TIGER-AI-Lab/VLM2Vec), unchanged
REFERENCE_QWEN2VL = """--model_name Qwen/Qwen2-VL-2B-Instruct --output_dir runs/test/mmeb-qwen-test
 --bf16 --pooling last --lora --dataset_name TIGER-Lab/MMEB-train --split_name original
 --subset_name ImageNet_1K N24News VisDial --num_sample_per_subset 10000 --image_dir /home/ziyan/
 --image_resolution high --max_len 4096 --logging_steps 1 --lr_scheduler_type linear --learning_rate 2e-5
 --max_steps 2000 --warmup_steps 200 --save_steps 1000 --normalize True --temperature 0.02
 --per_device_train_batch_size 8 --grad_cache True --gc_q_chunk_size 2 --gc_p_chunk_size 2
 --save_safetensors False --remove_unused_columns False --report_to none""".split()
# scripts/run_train_phi_3.5_v.sh of the reference implementation (OUTPUT_DIR filled in)
REFERENCE_PHI = """--model_name microsoft/Phi-3.5-vision-instruct --bf16 --pooling last --model_backbone phi
 --dataset_name TIGER-Lab/MMEB-train --subset_name ImageNet_1K N24News HatefulMemes InfographicsVQA ChartQA
 Visual7W VisDial CIRR NIGHTS WebQA MSCOCO --num_sample_per_subset 50000 --image_dir MMEB-train --max_len 256
 --num_crops 4 --output_dir runs/phi --logging_steps 1 --lr_scheduler_type linear --learning_rate 2e-5
 --max_steps 2000 --warmup_steps 200 --save_steps 1000 --normalize True --temperature 0.02
 --per_device_train_batch_size 8 --lora --lora_r 16 --grad_cache True --gc_q_chunk_size 2
 --gc_p_chunk_size 2""".split()


def _error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    names = (
        "model_name",
        "gc_q_chunk_size",
        "learning_rate",
        "ds_config",
        "resume",
        "lora_r",
        "save_steps",
        "skip_nonfinite_loss",
        "per_device_train_batch_size",
        "max_steps",
        "output_dir",
    )
    for name in names:
        assert f"--{name}" in text
    assert (
        text.count("(default:")
        >= len([f for f in TrainConfig.__dataclass_fields__.values() if not f.metadata.get("internal")]) - 8
    )
    assert "(default: 0.02)" in text and "(default: 'demo:emoji')" in text
    assert "default run (--model_name demo:emoji)" in text and "--symmetric_loss True" in text


def test_default_run_takes_the_demo_recipe_unless_set(tmp_path):
    from vlm2vec.demo.recipe import RECIPE

    config = load_config([], validate=False)
    assert config.model_name == "demo:emoji" and config.dataset_name is None and config.eval_data is None
    assert {k: getattr(config, k) for k in RECIPE} == RECIPE
    config = load_config(
        ["--max_steps", "2", "--per_device_train_batch_size", "4", "--temperature", "0.1"], validate=False
    )
    assert (config.max_steps, config.per_device_train_batch_size, config.temperature) == (2, 4, 0.1)
    assert config.train_batch_size is None and config.learning_rate == RECIPE["learning_rate"]
    tiny = load_config(["--model_name", "tiny:qwen2_vl"], validate=False)
    assert (tiny.max_steps, tiny.temperature, tiny.symmetric_loss) == (60, 0.02, False)  # plain defaults
    assert "demo_n_eval" in _error(["--demo_n_train", "900", "--demo_n_eval", "1000"])
    assert "--eval_data" in _error(["--eval_data", "/nonexistent/eval"])
    assert "not an MMEB eval directory" in _error(["--eval_data", str(tmp_path)])  # no dataset in it
    (tmp_path / "Task.jsonl").write_text("{}\n")  # any local MMEB eval directory, datasets.json or not
    assert load_config(["--eval_data", str(tmp_path)]).eval_data == str(tmp_path)


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model_name: tiny:qwen2_vl\nlearning_rate: 1e-5\nlora_r: 4\nsubset_name: [A, B]\n"
        "bf16: true\nmax_steps: 7\n"
    )
    config = load_config(
        ["--config", str(path), "--lora_r", "8", "--lr", "3e-4", "--grad_cache", "false"], validate=False
    )
    assert (config.lora_r, config.learning_rate, config.bf16) == (8, 3e-4, True)
    assert config.subset_name == ["A", "B"]
    assert config.max_steps == 7 and config.grad_cache is False
    assert config.temperature == TrainConfig().temperature  # untouched default
    assert config.explicit == {
        "model_name",
        "learning_rate",
        "lora_r",
        "subset_name",
        "bf16",
        "max_steps",
        "grad_cache",
    }


def test_reference_command_lines_run_unchanged():
    config = load_config(REFERENCE_QWEN2VL, validate=False)
    assert config.model_name == "Qwen/Qwen2-VL-2B-Instruct" and config.bf16 and config.lora
    assert config.subset_name == ["ImageNet_1K", "N24News", "VisDial"] and config.dataset_split == "original"
    assert (config.gc_q_chunk_size, config.gc_p_chunk_size, config.grad_cache) == (2, 2, True)
    assert (config.max_len, config.image_resolution, config.num_sample_per_subset) == (4096, "high", 10000)
    assert (config.learning_rate, config.warmup_steps, config.max_steps) == (2e-5, 200, 2000)
    assert config.report_to == "none" and set(config.ignored) == {"save_safetensors", "remove_unused_columns"}
    assert resolve_ds_config(config, 2)["train_batch_size"] == 16
    phi = load_config(REFERENCE_PHI, validate=False)
    assert phi.family == "phi3_v" and phi.num_crops == 4 and phi.lora_r == 16 and len(phi.subset_name) == 11


def test_paper_setups_and_deepspeed_configs():
    for name in PAPER_SETUPS:
        config = load_config(["--config", os.path.join(CONFIGS, f"{name}.yaml")], validate=False)
        text = 4096 if name.startswith("qwen") else 256  # text tokens: the reference's Qwen command / paper
        assert (config.temperature, config.train_batch_size, config.max_len) == (0.02, 1024, text), name
        assert config.max_steps == 2000 and config.learning_rate == 2e-5, name
        assert config.lora and config.lora_r == 8 and config.warmup_steps > 0 and config.bf16, name
        assert config.dora and config.num_sample_per_subset == 100000, name
        assert config.grad_cache and config.gc_q_chunk_size >= 1, name
        assert per_device_batch_size(config, 8) == 128
    stages = [(0, "ds_zero0"), (1, "ds_zero1"), (2, "ds_zero2"), (3, "ds_zero3"), (3, "ds_zero3_offload")]
    for stage, name in stages:
        config = load_config(
            ["--ds_config", os.path.join(CONFIGS, f"{name}.json"), "--bf16", "--model_name", "tiny:qwen2_vl"]
        )
        ds = resolve_ds_config(config, 4)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 32
        assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
        assert "auto" not in json.dumps(ds), name
    offload_json = os.path.join(CONFIGS, "ds_zero3_offload.json")
    tiny = ["--model_name", "tiny:qwen2_vl"]
    offload = resolve_ds_config(load_config(["--ds_config", offload_json, *tiny]), 1)
    assert offload["optimizer"]["params"]["lr"] == TrainConfig().learning_rate


def test_deepspeed_json_conflicts(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}))
    json_wins = resolve_ds_config(load_config(["--ds_config", str(path)]), 1)  # over an unset option
    assert json_wins["gradient_clipping"] == 0.5
    config = load_config(["--ds_config", str(path), "--max_grad_norm", "2.0"])
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 but --max_grad_norm is 2.0"):
        resolve_ds_config(config, 1)
    path.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(ConfigError, match="GradCache replaces gradient accumulation"):
        resolve_ds_config(load_config(["--ds_config", str(path)]), 1)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        per_device_batch_size(load_config(["--train_batch_size", "16"]), 3)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max_step", "3"], "unknown option --max_step (did you mean --max_steps"),
        (["--max_steps", "ten"], "argument --max_steps: invalid int value: 'ten'"),
        (["--lora", "maybe"], "argument --lora: expected true or false, got 'maybe'"),
        (["--pooling", "cls"], "invalid choice: 'cls'"),
        (["--dataset_name", "/no/such/mmeb"], "--dataset_name '/no/such/mmeb': no such file or directory"),
        (["--dataset_name", "TIGER-Lab/MMEB-train"], "(and the hub is offline)"),
        (["--image_dir", "/no/such/images"], "--image_dir '/no/such/images': no such directory"),
        (["--ds_config", "/no/such.json"], "--ds_config '/no/such.json': no such file"),
        (["--resume", "/no/such/checkpoint-5"], "no such checkpoint directory"),
        (["--config", "/no/such.yaml"], "--config '/no/such.yaml': no such file"),
        (["--gc_q_chunk_size", "0"], "--gc_q_chunk_size must be >= 1, got 0"),
        (["--temperature", "-1"], "--temperature must be a positive finite number"),
        (["--fp16"], "--fp16 is not supported"),
        (["--quantization", "nf4", "--lora", "false"], "add --lora"),
        (["--model_name", "tiny:gpt2"], "no tiny model of family 'gpt2'"),
        (["--model_backbone", "bert"], "--model_backbone 'bert' is unknown"),
        (["positional"], "unexpected argument(s) 'positional'"),
    ],
)
def test_bad_options_name_the_option(argv, expected):
    assert expected in _error(argv)


def test_bad_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    for text, expected in [
        ("learning_rat: 1e-4\n", "unknown key 'learning_rat' (did you mean learning_rate"),
        ("max_steps: ten\n", "max_steps must be an integer, got 'ten'"),
        ("lora: 3\n", "lora must be true or false, got 3"),
        ("subset_name: {a: 1}\n", "subset_name must be a list of names"),
        ("- just\n- a list\n", "must hold a mapping of option: value"),
        ("a: [unclosed\n", "is not valid YAML"),
    ]:
        path.write_text(text)
        message = _error(["--config", str(path)])
        assert expected in message and str(path) in message, message


def test_errors_come_before_any_model_or_engine_is_built():
    code = (
        "import sys\nfrom vlm2vec.train import main\nrc = main(sys.argv[1:])\n"
        "print('RESULT', rc, 'transformers' in sys.modules, 'deepspeed' in sys.modules)"
    )
    for argv in (["--dataset_name", "/no/such/mmeb"], ["--max_steps", "ten"], ["--bogus", "1"]):
        proc = subprocess.run(
            [sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert "RESULT 2 False False" in proc.stdout, (argv, proc.stdout, proc.stderr[-2000:])
        assert proc.stderr.startswith("vlm2vec/train.py: error: "), proc.stderr


def _zero_json(tmp_path, name: str, zero: dict, **top) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"zero_optimization": zero, **top}))
    return str(path)


def _checkpoint(tmp_path, world: int, stage: int, batch: int) -> str:
    """A checkpoint directory with just its trainer_state.json (what the resume checks read)."""
    path = tmp_path / f"checkpoint-w{world}-s{stage}-b{batch}"
    path.mkdir()
    state = {
        "step": 2,
        "world_size": world,
        "zero_stage": stage,
        "data": {"fingerprint": {"batch_size": batch}},
    }
    (path / "trainer_state.json").write_text(json.dumps(state))
    return str(path)


def test_launcher_stage_offload_world_size_combinations_refused_up_front(tmp_path):
    """Each bad combination stops in `main` before the process group, data or model exist: exit 2, one
    line from rank 0 naming what to change, nothing from the other ranks, no traceback."""
    offload_cpu = {"device": "cpu"}
    bf16_sharded = _checkpoint(tmp_path, 2, 0, 8)
    (tmp_path / os.path.basename(bf16_sharded) / "deepspeed").mkdir()
    (
        tmp_path
        / os.path.basename(bf16_sharded)
        / "deepspeed"
        / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ).touch()
    cases = [
        (["--ds_config", _zero_json(tmp_path, "s4", {"stage": 4})], 1, "use 0, 1, 2 or 3"),
        (["--ds_config", _zero_json(tmp_path, "p2", {"stage": 2, "offload_param": offload_cpu})], 2,
         "offload_param needs ZeRO-3"),
        (["--ds_config", _zero_json(tmp_path, "o0", {"stage": 0, "offload_optimizer": offload_cpu})], 1,
         "offload_optimizer needs ZeRO 1-3"),
        (["--ds_config", _zero_json(tmp_path, "oc", {"stage": 3, "offload_optimizer": offload_cpu})], 4,
         "needs DeepSpeed's CPU Adam"),
        (["--ds_config", _zero_json(tmp_path, "nv", {"stage": 3, "offload_param": {"device": "nvme"}})], 2,
         'device="nvme" is not supported'),
        (["--train_batch_size", "8"], 3, "not divisible by the 3 processes"),
        (["--resume", _checkpoint(tmp_path, 2, 2, 8), "--train_batch_size", "8"], 1,
         "written under ZeRO-2, this run uses ZeRO-0"),
        (["--resume", _checkpoint(tmp_path, 2, 0, 16)], 1, "pass --train_batch_size 16"),
        (["--resume", bf16_sharded, "--train_batch_size", "8"], 1, "bf16 optimizer under ZeRO-0"),
    ]  # fmt: skip
    code = (
        "import sys\nfrom vlm2vec.train import main\nrc = main(sys.argv[1:])\n"
        "print('RESULT', rc, 'transformers' in sys.modules, 'deepspeed' in sys.modules)"
    )
    for argv, world, expected in cases:
        for rank in range(min(world, 2)):
            env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank)}
            proc = subprocess.run(
                [sys.executable, "-c", code, *argv],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert "RESULT 2 False False" in proc.stdout, (argv, proc.stdout, proc.stderr[-2000:])
            if rank == 0:
                assert proc.stderr.startswith("vlm2vec/train.py: error: "), proc.stderr
                assert expected in proc.stderr and proc.stderr.count("\n") == 1, (argv, proc.stderr)
            else:
                assert proc.stderr == "", proc.stderr


def test_learning_rate_schedules():
    import torch

    from vlm2vec.train import make_scheduler

    def factors(*argv: str, total: int = 10) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        config = load_config(["--model_name", "tiny:qwen2_vl", *argv], validate=False)
        scheduler = make_scheduler(config, total)(optimizer)
        out = []
        for _ in range(total):
            out.append(round(scheduler.get_last_lr()[0], 6))
            optimizer.step()
            scheduler.step()
        return out

    assert factors("--warmup_steps", "2") == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    cosine = factors("--warmup_steps", "2", "--lr_scheduler_type", "cosine")
    assert cosine[:3] == [0.0, 0.5, 1.0] and cosine[6] == 0.5 and cosine[-1] < 0.04
    with_warmup = factors("--warmup_ratio", "0.2", "--lr_scheduler_type", "constant_with_warmup")
    assert with_warmup[1:4] == [0.5, 1.0, 1.0]
    assert set(factors("--lr_scheduler_type", "constant", "--warmup_steps", "3")) == {1.0}


OPTIONAL_PATHS = (
    "checkpoint_path",
    "dataset_name",
    "image_dir",
    "eval_data",
    "ds_config",
    "resume",
    "logging_dir",
)


@pytest.mark.parametrize("name", OPTIONAL_PATHS)
def test_an_empty_optional_path_means_none(name, tmp_path):
    """`--flag ''` (and `flag: ''` in YAML) is the way to turn an optional path off: None, not a path ''
    that fails as a missing directory or falls back to a default."""
    assert load_config([f"--{name}", ""]).__getattribute__(name) is None
    path = tmp_path / "run.yaml"
    path.write_text(f"{name}: ''\n")
    assert getattr(load_config(["--config", str(path)]), name) is None


def test_empty_eval_data_turns_the_default_runs_evaluation_off(tmp_path):
    """The default model fills in its default data; `--eval_data ''` must keep evaluation off instead of
    falling back to the default eval directory (built once, here in tmp_path)."""
    from vlm2vec.train_data import with_default_data

    small = ["--demo_dir", str(tmp_path), "--demo_n_train", "4", "--demo_n_eval", "4",
             "--demo_clipart_n_eval", "2", "--demo_clipart_drawings", "4", "--disable_tqdm"]  # fmt: skip
    off = with_default_data(load_config([*small, "--eval_data", ""]))
    assert off.dataset_name is not None and off.eval_data is None
    default = with_default_data(load_config(small))
    assert default.eval_data == os.path.join(str(tmp_path), "data", "eval")


def test_a_model_without_default_data_needs_dataset_name():
    """Only the default model has default data: another model without --dataset_name stops up front
    (exit 2, one line), before the process group, data or model exist."""
    code = (
        "import sys\nfrom vlm2vec.train import main\nrc = main(sys.argv[1:])\n"
        "print('RESULT', rc, 'transformers' in sys.modules, 'deepspeed' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--model_name", "tiny:qwen2_vl"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "RESULT 2 False False" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert proc.stderr.startswith("vlm2vec/train.py: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "pass --dataset_name" in proc.stderr, proc.stderr


def test_v3_and_export_options_are_checked_up_front(tmp_path):
    base = ["--model_name", "tiny:qwen2_vl", "--dataset_name", str(tmp_path)]
    config = load_config([*base, "--matryoshka_dims", "16,32", "--eval_dims", "8 16", "--positives", "any"])
    assert (config.matryoshka_dims, config.eval_dims, config.positives) == ([16, 32], [8, 16], "any")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("matryoshka_dims: [16, 32]\nfalse_negative_margin: 0.1\n")
    config = load_config([*base, "--config", str(yaml_file)])
    assert (config.matryoshka_dims, config.false_negative_margin) == ([16, 32], 0.1)
    for bad, needle in [
        (["--matryoshka_dims", "32,16"], "--matryoshka_dims"),
        (["--eval_dims", "0,8"], "--eval_dims"),
        (["--matryoshka_dims", "a,b"], "matryoshka_dims"),
        (["--positives", "some"], "positives"),
        (["--false_negative_margin", "inf"], "--false_negative_margin"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config([*base, *bad])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--export_dir .*not empty"):
        load_config([*base, "--export_dir", str(busy)])
    previous = tmp_path / "previous"
    previous.mkdir()
    for name in ("modules.json", "vlm2vec.json"):
        (previous / name).write_text("{}")
    assert load_config([*base, "--export_dir", str(previous)]).export_dir == str(previous)
