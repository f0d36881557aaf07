"""The engines side by side: DDP and FSDP against Horovod, 2 ranks, one torch thread each.

1. **Throughput**, the demo MLP on synthetic shards through the whole rank loop
   (``train_rank`` in a real barrier stage on ``local[2]``): rank 0's ``train/samples_per_second``,
   medians over rounds, engines alternating. Goal: ``ddp`` ≥ 0.95× Horovod.
2. **Memory per rank**, the Transformer of ``pipelines/text_fsdp.yaml`` (about 22 M parameters)
   trained a few AdamW steps on random tokens with ``ddp`` and with ``fsdp``: the bytes of
   parameters, gradients and optimizer state each rank holds, and each rank's RSS growth over
   its RSS before the model was built, at its peak and after the last step. Goal: ``fsdp`` ≤
   0.65× ``ddp``. Its step time too. Twice: with glibc's allocator as it comes (its mmap
   threshold rises as big blocks are freed, so freed tensors stay in the heap and the RSS),
   and with the threshold fixed at 128 KiB (``mallopt``, what ``MALLOC_MMAP_THRESHOLD_=131072``
   in the executors' environment does): freed tensors go back to the system.
3. **Activation checkpointing** (``train.activation_checkpointing``), the same Transformer at
   the largest text batch, freed memory returned, with ``ddp`` and ``fsdp``: FSDP's peak RSS
   growth with it over DDP's without it (goal ≤ 0.65×), and what it costs FSDP's step time.

    python -m benchmarks.engines                # writes results/engines.json
    python -m benchmarks.engines --memory-only  # 2 and 3 only (no throughput rounds)
"""

from __future__ import annotations

import argparse
import functools
import resource
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks._common import DEMO_MODEL, median, report
from benchmarks.scaling import shards
from lepton_spark.cluster.stage import BarrierSettings, run_barrier
from lepton_spark.config import SparkConfig, TrainConfig, load_config
from lepton_spark.data.session import spark_session
from lepton_spark.training.job import TrainSpec
from lepton_spark.training.worker import train_rank

ENGINES = ("horovod", "ddp", "fsdp")
TEXT_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "text_fsdp.yaml"


def throughput(spark: Any, folder: str, backend: str, batch: int) -> float:
    cfg = TrainConfig(
        backend=backend,
        epochs=1,
        batch_size=batch,
        threads_per_rank=1,
        progress_every_steps=100_000,
    )
    spec = TrainSpec(shard_folder=folder, train=cfg, model=DEMO_MODEL, verify_shards=False)
    results = run_barrier(
        spark, functools.partial(train_rank, spec), 2, settings=BarrierSettings(engine=backend)
    )
    return float(results[0].history[0]["train/samples_per_second"])


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
FIXED_THRESHOLD = 128 << 10


def _return_freed_memory() -> None:
    """glibc: serve blocks of 128 KiB and more by mmap, always, so that freeing them returns
    them to the system (by default the threshold grows past freed blocks up to 32 MiB)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, FIXED_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, FIXED_THRESHOLD)


def transformer_rank(
    backend: str, steps: int, batch: int, returned: bool, ctx: Any, checkpointing: bool = False
) -> dict[str, float]:
    """In one rank: a few AdamW steps of the text_fsdp Transformer; its memory and step time
    (``returned``: with freed memory given back, :func:`_return_freed_memory`;
    ``checkpointing``: its encoder layers recomputed in the backward pass)."""
    from lepton_spark.models import build_model, set_activation_checkpointing
    from lepton_spark.spec import FeatureSpec, TextFeature
    from lepton_spark.training.engines import start_engine
    from lepton_spark.training.optim import make_optimizer

    torch.set_num_threads(1)
    if returned:
        _return_freed_memory()
    pipeline = load_config(TEXT_PIPELINE)
    cfg = pipeline.train.model_copy(update={"backend": backend})
    engine = start_engine(cfg)
    try:
        text = pipeline.features.text[0]
        words = [f"w{i}" for i in range(text.max_vocabulary)]
        spec = FeatureSpec(
            numeric=[],
            categorical=[],
            texts=[TextFeature(name=text.name, vocabulary=words, max_length=text.max_length)],
            label="label",
            num_classes=4,
        )
        before = psutil.Process().memory_info().rss
        model = build_model(pipeline.model, spec, seed=0)
        set_activation_checkpointing(model, checkpointing)
        cpu = torch.device("cpu")
        model, optimizer = engine.wrap(model, lambda ps: make_optimizer(cfg, ps, 1e-4), cpu)
        generator = torch.Generator().manual_seed(engine.rank())
        times = []
        for _ in range(steps):
            ids = torch.randint(2, len(words) + 2, (batch, text.max_length), generator=generator)
            labels = torch.randint(0, 4, (batch,), generator=generator)
            started = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model({text.name: ids}), labels)
            engine.step(loss, optimizer, None)
            times.append(time.perf_counter() - started)
        held = sum(_local(p).numel() * p.element_size() for p in model.parameters())
        grads = sum(_local(p.grad).numel() * 4 for p in model.parameters() if p.grad is not None)
        state = sum(
            _local(v).numel() * v.element_size()
            for s in optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        after = psutil.Process().memory_info().rss
        return {
            "state_bytes": float(held + grads + state),
            "peak_rss_growth_bytes": float(peak - before),
            "end_rss_growth_bytes": float(after - before),
            "step_seconds": median(times[1:]),
        }
    finally:
        engine.shutdown()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (maybe sharded, DTensor) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def memory(
    spark: Any, backend: str, steps: int, batch: int, returned: bool, checkpointing: bool = False
) -> dict[str, float]:
    fn = functools.partial(
        transformer_rank, backend, steps, batch, returned, checkpointing=checkpointing
    )
    ranks = run_barrier(spark, fn, 2, settings=BarrierSettings(engine=backend))
    return {key: max(r[key] for r in ranks) for key in ranks[0]}  # the heavier rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--text-steps", type=int, default=6)
    parser.add_argument(
        "--text-batch",
        default="4,16",
        help="batch sizes of the Transformer runs (activations, unsharded, grow with it)",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the Transformer's memory runs (with and without activation checkpointing)",
    )
    args = parser.parse_args()

    spark = spark_session(SparkConfig(master="local[2]"), app_name="lepton-spark engines")
    rates: dict[str, list[float]] = {e: [] for e in ENGINES}
    if not args.memory_only:
        folder = shards(args.rows)  # the scaling benchmark's: 2 training shards, validation
        for _ in range(args.rounds):
            for backend in ENGINES:
                rates[backend].append(throughput(spark, folder, backend, args.batch))
                print(f"{backend}: {rates[backend][-1]:,.0f} samples/s", flush=True)
    batches = [int(b) for b in args.text_batch.split(",")]
    big = batches[-1]
    sizes = {b: memory(spark, b, args.text_steps, big, False) for b in ("ddp", "fsdp")}
    freed = {
        batch: {b: memory(spark, b, args.text_steps, batch, True) for b in ("ddp", "fsdp")}
        for batch in batches
    }
    checkpointed = {
        b: memory(spark, b, args.text_steps, big, True, checkpointing=True) for b in ("ddp", "fsdp")
    }
    for backend in sizes:
        print(f"{backend} transformer, batch {big}: {sizes[backend]}", flush=True)
        for batch in batches:
            print(f"{backend}, batch {batch}, freed returned: {freed[batch][backend]}", flush=True)
        print(f"{backend}, batch {big}, checkpointed: {checkpointed[backend]}", flush=True)
    spark.stop()

    def ratio(figures: dict[str, dict[str, float]], key: str) -> float:
        return figures["fsdp"][key] / figures["ddp"][key]

    returned: dict[str, float] = {}
    for batch in batches:
        for key in ("peak_rss_growth", "end_rss_growth"):
            name = f"fsdp_over_ddp_{key}_returned_batch{batch}"
            returned[name] = ratio(freed[batch], f"{key}_bytes")
    plain = freed[big]
    peak = "peak_rss_growth_bytes"
    ckpt = {
        f"fsdp_ckpt_over_ddp_peak_rss_growth_returned_batch{big}": checkpointed["fsdp"][peak]
        / plain["ddp"][peak],
        f"fsdp_ckpt_over_ddp_ckpt_peak_rss_growth_returned_batch{big}": ratio(checkpointed, peak),
        f"ddp_ckpt_over_plain_peak_rss_growth_returned_batch{big}": checkpointed["ddp"][peak]
        / plain["ddp"][peak],
        "ckpt_over_plain_step_seconds_fsdp": checkpointed["fsdp"]["step_seconds"]
        / plain["fsdp"]["step_seconds"],
        "ckpt_over_plain_step_seconds_ddp": checkpointed["ddp"]["step_seconds"]
        / plain["ddp"]["step_seconds"],
    }
    throughputs = {}
    if rates["horovod"]:
        horovod = median(rates["horovod"])
        throughputs = {
            "ddp_over_horovod_throughput": median(rates["ddp"]) / horovod,
            "fsdp_over_horovod_throughput": median(rates["fsdp"]) / horovod,
        }
    report(
        "engines",
        {
            **throughputs,
            "fsdp_over_ddp_state_bytes": ratio(sizes, "state_bytes"),
            "fsdp_over_ddp_peak_rss_growth": ratio(sizes, "peak_rss_growth_bytes"),
            "fsdp_over_ddp_end_rss_growth": ratio(sizes, "end_rss_growth_bytes"),
            **returned,
            "fsdp_over_ddp_step_seconds": ratio(sizes, "step_seconds"),
            "fsdp_returned_over_default_step_seconds": freed[big]["fsdp"]["step_seconds"]
            / sizes["fsdp"]["step_seconds"],
            **ckpt,
        },
        {
            "rows": args.rows,
            "batch": args.batch,
            "samples_per_second": rates,
            "transformer": sizes,
            "transformer_freed_memory_returned": {str(b): f for b, f in freed.items()},
            "transformer_checkpointed_freed_memory_returned": checkpointed,
            "memory_only": args.memory_only,
            "text_steps": args.text_steps,
            "text_batch": batches,
        },
    )


if __name__ == "__main__":
    main()
