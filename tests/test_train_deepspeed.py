"""The real `deepspeed` launcher: 2 CPU processes (gloo), ZeRO 0-3, tiny Qwen2-VL + LoRA, synthetic data.

One launch runs this file as the worker (`__main__` below) for all four stages:
  * one step four ways: GradCache (1 chunk / 2 chunks per side), the plain step on the same chunks, and
    the per-chunk-backward recipe (`set_gradient_accumulation_boundary` + `engine.backward` per chunk).
    The gradient reductions DeepSpeed issues during backward + step are counted by wrapping
    torch.distributed's reduce collectives (calls made from the loss's own code are not counted);
  * a short `vlm2vec.train.train` run: the loss falls, the weights are identical on both ranks;
  * a run whose loss is NaN: it stops with an error naming step and rows, or skips with the flag.
A second launch runs the published entry point `deepspeed vlm2vec/train.py --ds_config configs/ds_zero2.json`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDUCE_OPS = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
)
STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _synthetic_data(root) -> str:
    from vlm2vec.synthetic import write_synthetic_mmeb

    return str(write_synthetic_mmeb(root, rows=8, image_size=32, seed=1).train_dir)


# ----------------------------------------------------------------------------------------------- tests
def test_zero_stages_reduce_once_per_step_and_train(tmp_path):
    from safetensors.torch import load_file

    data = _synthetic_data(tmp_path / "data")
    out = tmp_path / "out"
    _launch([os.path.join("tests", "test_train_deepspeed.py"), "--out", str(out), "--data", data], 600)
    results = json.loads((out / "results.json").read_text())
    nonfinite = results.pop("nonfinite")
    assert sorted(results) == ["0", "1", "2", "3"]
    for stage, r in results.items():
        counts = r["reductions"]
        # GradCache: the same reductions for 1 or 2 chunks per side, as many as the plain step's
        assert counts["gradcache_1_chunk"] > 0, (stage, counts)
        assert counts["gradcache_2_chunks"] == counts["gradcache_1_chunk"] == counts["plain"], (stage, counts)
        if stage in ("2", "3"):  # ZeRO-2/3 reduce in every engine.backward: per-chunk backwards cost more
            assert counts["per_chunk_backward"] > counts["gradcache_2_chunks"], (stage, counts)
        # GradCache gives the plain step's parameters (fp32, dropout on); so does the per-chunk recipe under
        # ZeRO 0-2 (under ZeRO-3 DeepSpeed 0.19.8 gives other parameters with it: measured, not asserted)
        assert r["param_diff"]["gradcache_vs_plain"] <= 1e-6, (stage, r["param_diff"])
        if stage != "3":
            assert r["param_diff"]["per_chunk_vs_plain"] <= 1e-5, (stage, r["param_diff"])
        assert r["param_diff"]["step_size"] > 1e-4, (stage, r["param_diff"])
        # a short training run: identical replicas, loss falls
        assert r["rank_spread"] == 0.0, (stage, r["rank_spread"])
        losses = r["losses"]
        assert len(losses) == STEPS and all(map(lambda v: v == v, losses)), (stage, losses)
        assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), (stage, losses)
        assert r["checkpoints"] == [STEPS // 2, STEPS], (stage, r["checkpoints"])
    # a NaN loss (on both ranks) stops before the optimizer step, naming the step and the batch's rows ...
    assert nonfinite["error"] and "non-finite loss at step 1" in nonfinite["error"], nonfinite
    assert "ShapeClassification.jsonl, row" in nonfinite["error"], nonfinite["error"]
    assert not [n for n in os.listdir(nonfinite["stop_dir"]) if n.startswith("checkpoint-")]
    # ... or, with --skip_nonfinite_loss, is skipped: the adapter never moves from its init (LoRA B = 0)
    assert nonfinite["skipped_steps"] == [1, 2] and all(v != v for v in nonfinite["losses"]), nonfinite
    adapter = load_file(os.path.join(nonfinite["skip_dir"], "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(int((v != 0).sum()) == 0 for v in lora_b)


def test_deepspeed_entry_point_trains_tiny_model_and_output_loads(tmp_path):
    import torch
    from PIL import Image

    from vlm2vec.model import VLM2Vec
    from vlm2vec.synthetic import write_synthetic_mmeb

    out = tmp_path / "run"
    # a model other than the default has no default data: the rows the run used to write for itself
    data = write_synthetic_mmeb(tmp_path / "data", rows=64, image_size=48, seed=0).train_dir
    _launch(
        [
            "vlm2vec/train.py",
            "--ds_config",
            "configs/ds_zero2.json",
            "--output_dir",
            str(out),
            "--model_name",
            "tiny:qwen2_vl",
            "--dataset_name",
            str(data),
            "--max_steps",
            "3",
            "--save_steps",
            "2",
            "--disable_tqdm",
        ],
        timeout=400,
    )  # the default model is the emoji demo (tests/test_train_default.py)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in log)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert list((out / "tensorboard").iterdir()), "no TensorBoard events written"
    texts, images = ["<|image_1|> a shape", "a red circle"], [Image.new("RGB", (40, 40), "red"), None]
    final = VLM2Vec.from_pretrained(str(out)).encode(texts, images, show_progress=False)
    at_3 = VLM2Vec.from_pretrained(str(out / "checkpoint-3")).encode(texts, images, show_progress=False)
    at_2 = VLM2Vec.from_pretrained(str(out / "checkpoint-2")).encode(texts, images, show_progress=False)
    torch.testing.assert_close(final, at_3)
    assert (final - at_2).abs().max() > 1e-6  # step 3 changed the adapter


# ---------------------------------------------------------------------------------------------- worker
class ReductionCounter:
    """Counts gradient-reduction collectives issued by DeepSpeed while `active` (wraps torch.distributed;
    must be installed before DeepSpeed creates its communication backend)."""

    def __init__(self) -> None:
        self.active = False
        self.ops: collections.Counter[str] = collections.Counter()

    def install(self) -> None:
        import torch.distributed as dist

        for name in REDUCE_OPS:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if self.active and self._called_by_deepspeed():
                self.ops[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    @staticmethod
    def _called_by_deepspeed() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename.replace(os.sep, "/")
            if "/kernels/" in path or "/vlm2vec_kernels/" in path:
                return False  # the loss's cross-device gather/scatter, not a gradient reduction
            if "/deepspeed/" in path:
                return True
            frame = frame.f_back
        return False

    @contextlib.contextmanager
    def counting(self):
        self.ops.clear()
        self.active = True
        try:
            yield self.ops
        finally:
            self.active = False


def _stage_config(stage: int, out: str) -> str:
    """The shipped JSON; ZeRO-3 with every parameter partitioned (tiny tensors would stay whole)."""
    path = os.path.join(REPO, "configs", f"ds_zero{stage}.json")
    if stage != 3:
        return path
    with open(path) as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    mine = os.path.join(out, "ds_zero3_partition_all.json")
    with open(mine, "w") as f:
        json.dump(ds, f)
    return mine


def _flat_trainable(engine, stage: int):
    import deepspeed
    import torch

    params = [p for p in engine.module.parameters() if p.requires_grad]
    gather = deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext()
    with gather:
        return torch.cat([p.detach().float().flatten().clone() for p in params])


def _one_step(config_args: list[str], mode: str, stage: int, counter: ReductionCounter) -> tuple:
    """(reductions during backward + step, trainable params before, after) for one step of `mode`."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from vlm2vec import build, train, train_data
    from vlm2vec.config_parse import load_config
    from vlm2vec.ds_config import resolve_ds_config
    from vlm2vec.gradcache import contrastive_step

    chunk = "4" if mode == "gradcache_1_chunk" else "2"
    config = load_config([*config_args, "--gc_q_chunk_size", chunk, "--gc_p_chunk_size", chunk])
    rank, world = dist.get_rank(), dist.get_world_size()
    train.seed_everything(config.seed)
    model = build.build_model(config)
    batches, collate, _ = train_data.make_batches(config, train_data.load_data(config), model, rank, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ds_config = resolve_ds_config(config, world)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    before = _flat_trainable(engine, stage)
    batch = collate(batches[0])
    loss_fn = train.loss_function(config.temperature, batch.targets, dist.group.WORLD)
    train.seed_everything(1234 + rank)
    with model.reuse_vision_features():
        if mode == "per_chunk_backward":  # the reference's GradCache, driven through the engine per chunk
            chunks = batch.query_chunks + batch.cand_chunks
            states, reps = [], []
            with torch.no_grad():
                for inputs in chunks:
                    states.append(torch.get_rng_state())
                    reps.append(engine.module(inputs))
            n_q = len(batch.query_chunks)
            q = torch.cat(reps[:n_q]).requires_grad_()
            c = torch.cat(reps[n_q:]).requires_grad_()
            loss_fn(q, c).backward()
            sizes = [len(r) for r in reps]
            cached = list(q.grad.split(sizes[:n_q])) + list(c.grad.split(sizes[n_q:]))
            with counter.counting() as ops:
                for k, (inputs, state, grad) in enumerate(zip(chunks, states, cached)):
                    torch.set_rng_state(state)
                    engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
                    engine.backward((engine.module(inputs) * grad).sum())
                engine.step()
        else:
            loss = contrastive_step(
                engine.module, batch.query_chunks, batch.cand_chunks, loss_fn, grad_cache=mode != "plain"
            )
            with counter.counting() as ops:
                engine.backward(loss)
                engine.step()
    count = sum(ops.values())
    after = _flat_trainable(engine, stage)
    engine.destroy()
    return count, before, after


def _nonfinite_runs(common: list[str], out: str) -> dict:
    """temperature 1e-39 (1/tau overflows fp32): the first loss is NaN. Stop with an error, or skip."""
    from vlm2vec import train
    from vlm2vec.config_parse import load_config

    args = [*common, "--temperature", "1e-39", "--max_steps", "2", "--save_steps", "0"]
    try:
        train.train(load_config([*args, "--output_dir", os.path.join(out, "nan_stop")]))
        error = None
    except train.NonFiniteLossError as err:
        error = str(err)
    skip_dir = os.path.join(out, "nan_skip")
    result = train.train(load_config([*args, "--output_dir", skip_dir, "--skip_nonfinite_loss"]))
    result.engine.destroy()
    losses = [result.losses[s] for s in sorted(result.losses)]
    return {
        "error": error,
        "stop_dir": os.path.join(out, "nan_stop"),
        "skip_dir": skip_dir,
        "skipped_steps": result.skipped_steps,
        "losses": losses,
    }


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True)
    args, _ = parser.parse_known_args(argv)  # the launcher adds --local_rank
    counter = ReductionCounter()
    counter.install()
    from vlm2vec import train

    rank, world, _ = train.init_distributed()
    import torch
    import torch.distributed as dist

    from vlm2vec.config_parse import load_config

    os.makedirs(args.out, exist_ok=True)
    dist.barrier()
    results = {}
    common = [
        "--model_name",
        "tiny:qwen2_vl",
        "--dataset_name",
        args.data,
        "--subset_name",
        "ShapeClassification",
        "--num_sample_per_subset",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--temperature",
        "0.05",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--report_to",
        "none",
        "--disable_tqdm",
    ]
    try:
        for stage in (0, 1, 2, 3):
            ds_config = _stage_config(stage, args.out) if rank == 0 else None
            holder = [ds_config]
            dist.broadcast_object_list(holder, src=0)
            step_dir = os.path.join(args.out, f"step{stage}")
            step_args = [*common, "--ds_config", holder[0], "--output_dir", step_dir]
            counts, params = {}, {}
            for mode in ("gradcache_1_chunk", "gradcache_2_chunks", "plain", "per_chunk_backward"):
                counts[mode], before, params[mode] = _one_step(step_args, mode, stage, counter)
            diff = {
                "gradcache_vs_plain": float((params["gradcache_2_chunks"] - params["plain"]).abs().max()),
                "per_chunk_vs_plain": float((params["per_chunk_backward"] - params["plain"]).abs().max()),
                "step_size": float((params["plain"] - before).abs().max()),
            }
            out_dir = os.path.join(args.out, f"train{stage}")
            config = load_config(
                [
                    *common,
                    "--ds_config",
                    holder[0],
                    "--output_dir",
                    out_dir,
                    "--max_steps",
                    str(STEPS),
                    "--save_steps",
                    str(STEPS // 2),
                    "--learning_rate",
                    "1e-3",
                ]
            )
            result = train.train(config)
            mine = _flat_trainable(result.engine, stage)
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            result.engine.destroy()
            from vlm2vec.checkpoint import list_checkpoints

            results[str(stage)] = {
                "reductions": counts, "param_diff": diff,
                "losses": [result.losses[s] for s in sorted(result.losses)],
                "rank_spread": float(max((e - everyone[0]).abs().max() for e in everyone)),
                "checkpoints": [s for s, _ in list_checkpoints(out_dir)],
            }  # fmt: skip
            if rank == 0:
                print(f"ZeRO-{stage}: {json.dumps(results[str(stage)])}", flush=True)
        results["nonfinite"] = _nonfinite_runs(common, args.out)
        if rank == 0:
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
