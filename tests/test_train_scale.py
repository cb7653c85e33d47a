"""The trainer at scale on 2 CPU processes (gloo, the real `deepspeed` launcher, tiny Qwen2-VL + LoRA):

  * ZeRO-1/2/3 on mixed image/text data whose ranks differ in modality in the same step (checked
    here before anything runs), with frozen-vision feature reuse on and off: training runs, saves,
    resumes, and the adapter after N steps equals a 1-process full-batch run's (no dropout, fp32);
  * resume at another world size: a ZeRO-3 run saved on 2 processes continues on 1 and the reverse,
    logging the losses of an uninterrupted run on the new world size;
  * ZeRO-3 with CPU offload of parameters and optimizer: trains, saves, resumes;
  * partitioned loading: peak memory per rank while loading a >= 100M-parameter checkpoint.

Every launch has a timeout: a hang (the failure mode of diverging ZeRO-3 collectives) fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
    "MALLOC_MMAP_THRESHOLD_": "262144",  # freed tensors go back to the OS (memory measurements)
}  # fmt: skip
STEPS, SAVE_AT, GLOBAL_BATCH = 4, 2, 8
STAGES = (1, 2, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _deepspeed(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return _run(["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), *args], timeout)


def _python(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    return _run([sys.executable, *args], timeout)


def _ds_config(stage: int, directory: str) -> str:
    """The shipped JSON of `stage`; ZeRO-3 partitions every parameter (tiny ones would stay whole)."""
    with open(os.path.join(REPO, "configs", f"ds_zero{stage}.json")) as f:
        ds = json.load(f)
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = os.path.join(directory, f"ds_zero{stage}.json")
    with open(path, "w") as f:
        json.dump(ds, f)
    return path


def _options(data: str, out: str, ds_config: str, *extra: str) -> list[str]:
    return [
        "--model_name", "tiny:qwen2_vl", "--dataset_name", data, "--num_hard_negatives", "1",
        "--train_batch_size", str(GLOBAL_BATCH), "--gc_q_chunk_size", "2", "--gc_p_chunk_size", "3",
        "--max_steps", str(STEPS), "--save_steps", str(SAVE_AT), "--learning_rate", "1e-3",
        "--temperature", "0.05", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--ds_config", ds_config, "--output_dir", out, "--report_to", "none", "--disable_tqdm", *extra,
    ]  # fmt: skip


def _adapter(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> str:
    """Text->image and image classification rows mixed in every step; some step gives one rank image queries
    and the other none (asserted: otherwise the test could not fail the way ZeRO-3 used to)."""
    from vlm2vec.data import TrainBatches, load_train_data
    from vlm2vec.synthetic import write_synthetic_mmeb

    root = tmp_path_factory.mktemp("mixed")
    made = write_synthetic_mmeb(
        root, rows=8, image_size=32, seed=3, subsets=("ShapeRetrieval_t2i", "ShapeClassification")
    )
    data = load_train_data(str(made.train_dir), num_negatives=1)
    differs = []
    for step in range(STEPS):
        has_image = []
        for rank in (0, 1):
            batch = TrainBatches(data, GLOBAL_BATCH, seed=42, num_steps=STEPS, rank=rank, world_size=2)[step]
            has_image.append(any(img is not None for img in batch.query_images))
        differs.append(has_image[0] != has_image[1])
    assert any(differs), "no step where the ranks differ in query modality: pick another seed"
    return str(made.train_dir)


def test_mixed_modality_zero_stages_match_one_process(mixed_data, tmp_path):
    reference = str(tmp_path / "one_process")
    _python(["vlm2vec/train.py", *_options(mixed_data, reference, _ds_config(0, str(tmp_path)))], 300)
    expected = _adapter(reference)
    out = tmp_path / "two_ranks"
    _deepspeed([os.path.join("tests", "test_train_scale.py"), "--out", str(out), "--data", mixed_data], 600)
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == [f"{s}-{r}" for s in STAGES for r in ("False", "True")]
    for name, r in results.items():
        assert r["dummy_passes"] > 0, (name, r)  # the ranks really differed in some chunk
        assert r["rank_spread"] == 0.0, (name, r)
        run, resumed = _adapter(r["dir"]), _adapter(r["resumed_dir"])
        assert _max_diff(run, expected) < 1e-6, (name, _max_diff(run, expected))
        assert _max_diff(resumed, run) < 1e-6, (name, _max_diff(resumed, run))
        assert max(float(v.abs().max()) for k, v in run.items() if "lora_B" in k) > 1e-3  # it trained
        ref_losses, losses = _losses(reference), _losses(r["dir"])
        assert all(abs(losses[s] - ref_losses[s]) < 1e-5 for s in ref_losses), (name, losses, ref_losses)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_at_another_world_size(mixed_data, tmp_path, stage):
    ds = _ds_config(stage, str(tmp_path))
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    _deepspeed(["vlm2vec/train.py", *_options(mixed_data, two, ds)], 300)
    _python(["vlm2vec/train.py", *_options(mixed_data, one, ds)], 300)
    two_to_one, one_to_two = str(tmp_path / "two_to_one"), str(tmp_path / "one_to_two")
    checkpoint = f"checkpoint-{SAVE_AT}"
    from_two = _options(mixed_data, two_to_one, ds, "--resume", os.path.join(two, checkpoint))
    resumed = _python(["vlm2vec/train.py", *from_two], 300)
    assert "written by 2 processes" in resumed.stdout + resumed.stderr
    from_one = _options(mixed_data, one_to_two, ds, "--resume", os.path.join(one, checkpoint))
    _deepspeed(["vlm2vec/train.py", *from_one], 300)
    for moved, uninterrupted in ((two_to_one, one), (one_to_two, two)):
        got, want = _losses(moved), _losses(uninterrupted)
        assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1)), got
        for step in got:
            assert abs(got[step] - want[step]) < 1e-5, (moved, step, got, want)
        assert _max_diff(_adapter(moved), _adapter(uninterrupted)) < 1e-6


def test_zero3_cpu_offload_trains_saves_resumes(mixed_data, tmp_path):
    """configs/ds_zero3_offload.json as shipped (parameters and optimizer on the CPU, DeepSpeedCPUAdam,
    JIT-built on first use): trains on 2 ranks, saves, and a resume from the middle repeats the
    uninterrupted run's losses and adapter."""
    ds = os.path.join(REPO, "configs", "ds_zero3_offload.json")
    run, resumed = str(tmp_path / "run"), str(tmp_path / "resumed")
    _deepspeed(["vlm2vec/train.py", *_options(mixed_data, run, ds)], 600)
    checkpoint = os.path.join(run, f"checkpoint-{SAVE_AT}")
    _deepspeed(["vlm2vec/train.py", *_options(mixed_data, resumed, ds, "--resume", checkpoint)], 300)
    want, got = _losses(run), _losses(resumed)
    assert sorted(want) == list(range(1, STEPS + 1)) and want[STEPS] < want[1], want
    assert all(abs(got[s] - want[s]) < 1e-5 for s in range(SAVE_AT + 1, STEPS + 1)), (got, want)
    assert _max_diff(_adapter(resumed), _adapter(run)) < 1e-6


DORA_CHECK = """
import sys, deepspeed
from vlm2vec import build, train
from vlm2vec.config_parse import load_config
from vlm2vec.ds_config import resolve_ds_config
train.init_distributed()
config = load_config(["--model_name", sys.argv[1], "--ds_config", sys.argv[2], "--dora", "--report_to=none"])
train.seed_everything(0)
whole = build.build_model(config)
train.seed_everything(0)
part = build.build_model(config, ds_config=resolve_ds_config(config, 1))
assert all(hasattr(p, "ds_id") for p in part.parameters() if not p.requires_grad), "not partitioned"
mags = [{n: p for n, p in m.named_parameters() if "magnitude" in n} for m in (whole, part)]
with deepspeed.zero.GatheredParameters([p for p in part.parameters() if hasattr(p, "ds_id")]):
    print("DIFF", len(mags[0]), max(float((mags[0][n] - mags[1][n]).abs().max()) for n in mags[0]))
"""


def test_dora_attaches_to_a_partitioned_model(tmp_path):
    """DoRA's magnitudes are the base weights' column norms: on a model loaded partitioned (ZeRO-3) they
    must come out as on the whole model (peft gathers the weights while transformers' DeepSpeed config
    is alive)."""
    from vlm2vec.model import VLM2Vec

    model = str(tmp_path / "tiny")
    VLM2Vec.tiny("qwen2_vl").save_pretrained(model)
    done = _python(["-c", DORA_CHECK, model, _ds_config(3, str(tmp_path))], 300)
    count, diff = done.stdout.split("DIFF")[1].split()
    assert int(count) > 0 and float(diff) == 0.0, done.stdout[-2000:]


def _write_large_qwen2_vl(path: str) -> int:
    """A Qwen2-VL of >= 100M parameters (tiny's tokenizer and vision tower, a 1024-wide 8-layer LM) saved
    as a loadable VLM2Vec directory; returns the parameter count."""
    from vlm2vec.backbones import get_family
    from vlm2vec.model import VLM2Vec

    family = get_family("qwen2_vl")
    small, processor = family.tiny()
    config = small.config
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 4096, 8
    text.num_attention_heads, text.num_key_value_heads = 64, 32  # head_dim 16 keeps tiny's M-RoPE split
    text.layer_types = ["full_attention"] * 8
    config.vision_config.hidden_size = 1024  # the merger's output feeds the LM
    torch.manual_seed(0)
    large = type(small)(config)
    VLM2Vec(large, processor, family).save_pretrained(path)
    return sum(p.numel() for p in large.parameters())


def test_partitioned_loading_peak_memory(tmp_path):
    """Peak private memory per rank from `build_model` to a ready ZeRO-3 engine, for a 127M-parameter
    checkpoint: loaded partitioned (zero.Init through transformers' HfDeepSpeedConfig) vs loaded whole
    and partitioned by `deepspeed.initialize` (the way before). Measured as anonymous RSS (sampled every
    2 ms) with a fixed malloc mmap threshold, so freed tensors leave the process and the number is
    what a rank holds; the checkpoint's own file pages (read through mmap) are not counted."""
    model = str(tmp_path / "large")
    assert _write_large_qwen2_vl(model) >= 100e6
    peaks = {}
    for mode in ("whole", "zero3"):
        out = tmp_path / mode
        worker = [os.path.join("tests", "test_train_scale.py"), "--out", str(out), "--rss", mode, model]
        _deepspeed(worker, 300)
        peaks[mode] = json.loads((out / "rss.json").read_text())
    print(json.dumps(peaks))
    for rank in ("0", "1"):
        assert peaks["zero3"][rank]["partitioned"], peaks
    # rank 1 received the whole model in the old way (broadcast into its copy); rank 0 only ever held
    # its partition there too, as the broadcast source reading the mapped file
    assert peaks["zero3"]["1"]["anon_mib"] < 0.75 * peaks["whole"]["1"]["anon_mib"], peaks
    worst = {mode: max(r["anon_mib"] for r in by_rank.values()) for mode, by_rank in peaks.items()}
    assert worst["zero3"] < 0.75 * worst["whole"], peaks


# ---------------------------------------------------------------------------------------------- worker
def _rss_worker(out: str, mode: str, model: str) -> None:
    """Peak anonymous RSS (MiB above the start) of building `model` + deepspeed.initialize at ZeRO-3."""
    import threading
    import time

    import deepspeed
    import torch.distributed as dist

    from vlm2vec import build
    from vlm2vec.config_parse import load_config
    from vlm2vec.ds_config import resolve_ds_config

    def anon_mib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon:"))

    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(out, exist_ok=True)
    ds_path = _ds_config(3, out) if rank == 0 else None
    holder = [ds_path]
    dist.broadcast_object_list(holder, src=0)
    config = load_config(["--model_name", model, "--ds_config", holder[0], "--report_to", "none"])
    ds_config = resolve_ds_config(config, world)
    start, peak, done = anon_mib(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    model_ = build.build_model(config, ds_config=ds_config if mode == "zero3" else None)
    partitioned = all(hasattr(p, "ds_id") for p in model_.parameters() if not p.requires_grad)
    trainable = [p for p in model_.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model_, optimizer=torch.optim.AdamW(trainable), config=ds_config)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    mine = {"anon_mib": peak[0] - start, "partitioned": partitioned, "seconds": round(seconds, 1)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(os.path.join(out, "rss.json"), "w") as f:
            json.dump({str(r): v for r, v in enumerate(everyone)}, f)
    engine.destroy()


def _worker(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--data")
    parser.add_argument("--rss", nargs=2, metavar=("MODE", "MODEL"))
    args, _ = parser.parse_known_args(argv)  # the launcher adds --local_rank
    from vlm2vec import train
    from vlm2vec.config_parse import load_config
    from vlm2vec.model import VLM2Vec

    rank, world, _ = train.init_distributed()
    import torch.distributed as dist

    if args.rss:
        try:
            _rss_worker(args.out, *args.rss)
        finally:
            dist.destroy_process_group()
        return 0

    dummies = []
    original = VLM2Vec._dummy_image_features

    def counted(self):
        dummies.append(1)
        return original(self)

    VLM2Vec._dummy_image_features = counted
    results = {}
    try:
        os.makedirs(args.out, exist_ok=True)
        for stage in STAGES:
            holder = [_ds_config(stage, args.out) if rank == 0 else None]
            dist.broadcast_object_list(holder, src=0)
            for reuse in (False, True):
                out = os.path.join(args.out, f"zero{stage}_reuse{reuse}")
                options = _options(args.data, out, holder[0], "--reuse_vision_features", str(reuse))
                dummies.clear()
                result = train.train(load_config(options))
                flat = torch.cat([p.detach().flatten() for p in _trainable(result.engine, stage)])
                everyone = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(everyone, flat)
                result.engine.destroy()
                passes = torch.tensor([len(dummies)])
                dist.all_reduce(passes)
                resumed_dir = out + "_resumed"
                resume = ["--resume", os.path.join(out, f"checkpoint-{SAVE_AT}"), "--output_dir", resumed_dir]
                train.train(load_config([*options, *resume])).engine.destroy()
                results[f"{stage}-{reuse}"] = {
                    "dir": out, "resumed_dir": resumed_dir, "dummy_passes": int(passes),
                    "rank_spread": float(max((e - everyone[0]).abs().max() for e in everyone)),
                }  # fmt: skip
        if rank == 0:
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


def _trainable(engine, stage: int) -> list[torch.Tensor]:
    import contextlib

    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    gather = deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext()
    with gather:
        return [p.detach().clone() for p in params]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
