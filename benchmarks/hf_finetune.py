"""Fine-tuning a pretrained Hugging Face model end to end from a DataFrame: lepton-spark with
``model: {name: hf}`` and ``train.backend: ddp`` against HF ``Trainer`` under Spark's
``TorchDistributor``, 2 ranks of 1 torch thread on ``local[2]``, alternating rounds.

The model is the tests' tiny BERT (``tests/hf_fixture.py``: 2 layers of width 64, a WordPiece
vocabulary trained on the generated topics corpus, ``save_pretrained``), made once per run and
shared by both sides (its WordPiece vocabulary comes out different on each call: ``tokenizers``'
trainer is not deterministic, so accuracies move from run to run, not between the sides); the
data is that topics corpus (4 topics), ``--rows`` rows of it (default 20,000; the tests use
6,000), 2 epochs of batch 32 a rank, AdamW at ``--lr`` a rank (default 5e-4, ×2 ranks: 1e-3;
the tests' 2e-3 a rank fine-tunes 6,000 rows, but over 20,000 rows it diverges to chance on both
sides alike).

- **Ours**: ``run_pipeline`` (the source generated on Spark, the text tokenised on the executors
  with the model's fast tokenizer, the shards written afresh, the barrier stage's DDP ranks, the
  MLflow run and the logged model), from the raw source to ``val/accuracy``.
- **Theirs**, as a user writes it by hand: the same source and the same seeded split on Spark
  (``data.prepare.split``, the same fraction and seed; it hashes the raw text and label where
  ours hashes the token ids, so other rows are held out, about as many), the raw text and label
  saved as Parquet, then a function for ``TorchDistributor`` that reads
  the files with pyarrow, tokenises them with ``AutoTokenizer`` (the same ``max_length``,
  padded, cut), loads ``AutoModelForSequenceClassification`` and fine-tunes it with
  ``transformers.Trainer`` (the same epochs, batch per rank, AdamW, learning rate after our
  linear scaling, no weight decay, constant schedule, no gradient clipping, no checkpoints),
  then predicts the validation split (gathered over the ranks) for its accuracy. Ours also
  validates and checkpoints after each epoch; theirs validates once and saves nothing.

Every rank of theirs reads all the training files: ``Trainer`` deals the batches over the ranks
itself (accelerate's distributed sampler), as its users rely on; a rank reading only its share
of the files would train on half the data. Goal: ours ≥ 1.3× faster. Both accuracies are
printed and recorded: the comparison holds only where both reach about the same.

``Trainer`` needs ``accelerate`` (the ``bench`` extra): ``make bench-hf-finetune`` installs it.

    python -m benchmarks.hf_finetune     # writes results/hf_finetune.json
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks._common import WORK, median, report
from lepton_spark import run_pipeline
from lepton_spark.config import PipelineConfig
from lepton_spark.data.session import spark_session
from tests.hf_fixture import TOPICS, make_tiny_bert

MAX_LENGTH = 32  # tokens per text, both sides (as tests/hf/test_hf.py)
MIN_ACCURACY = 0.9  # below it on either side, the two did not fine-tune the same way


def config(work: Path, bert: Path, rows: int, epochs: int, lr: float) -> PipelineConfig:
    """``tests/hf/test_hf.py``'s DDP pipeline at ``rows`` topics rows, 1 torch thread a rank,
    its shards, checkpoints and MLflow store under ``work``."""
    source = TOPICS.model_copy(update={"rows": rows})
    return PipelineConfig.model_validate(
        {
            "name": "bench-hf-finetune",
            "spark": {"master": "local[2]"},
            "sources": {"docs": {"generate": source.model_dump()}},
            "features": {
                "text": [{"name": "text", "max_length": MAX_LENGTH}],
                "label": "label",
                "num_classes": 4,
            },
            "shards": {"root": str(work / "shards")},
            "train": {
                "num_workers": 2,
                "epochs": epochs,
                "batch_size": 32,
                "lr": lr,
                "backend": "ddp",
                "threads_per_rank": 1,
                "checkpoint_root": str(work / "checkpoints"),
            },
            "model": {"name": "hf", "pretrained": str(bert)},
            "tracking": {
                "local_store": str(work / "mlruns-data"),
                "registered_model": None,
                "system_metrics_interval_s": None,
            },
        }
    )


STAGES: list[dict[str, float]] = []  # where our time went, per round
THEIRS_STEPS: list[dict[str, float]] = []  # where their time went, per round


def ours(spark: Any, cfg: PipelineConfig) -> tuple[float, float]:
    shutil.rmtree(cfg.shards.root, ignore_errors=True)  # written afresh, as theirs is
    started = time.perf_counter()
    result = run_pipeline(cfg, spark=spark, progress=lambda e: None)
    seconds = time.perf_counter() - started
    stages = {k: float(v) for k, v in result.timings.items()}
    # The rank loop alone (no launch, no model build): the last epoch's seconds.
    stages["last_epoch"] = float(result.metrics["train/epoch_seconds"])
    STAGES.append(stages)
    print(f"lepton_ddp stages: {stages}", flush=True)
    return seconds, float(result.metrics["val/accuracy"])


def theirs(spark: Any, cfg: PipelineConfig, work: Path) -> tuple[float, float]:
    from pyspark.ml.torch.distributor import TorchDistributor

    from lepton_spark.data.prepare import split
    from lepton_spark.data.sources import load_and_transform
    from lepton_spark.training.optim import scaled_lr

    parquet = work / "parquet"
    shutil.rmtree(parquet, ignore_errors=True)
    started = time.perf_counter()
    docs = load_and_transform(spark, cfg).select("text", "label")
    train, validation = split(docs, cfg.split)
    train.write.parquet(str(parquet / "train"))
    validation.write.parquet(str(parquet / "validation"))
    spark_seconds = time.perf_counter() - started
    t = cfg.train
    settings = {
        "pretrained": cfg.model.pretrained,
        "num_labels": cfg.features.num_classes,
        "max_length": MAX_LENGTH,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "eval_batch_size": max(t.batch_size, 4096),  # as our validation loader
        "lr": scaled_lr(t, t.num_workers),  # ours: lr × ranks (linear scaling), AdamW
        "weight_decay": t.weight_decay,
        "seed": t.seed,
        "output_dir": str(work / "trainer"),
    }
    done = TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(
        finetune_with_trainer, str(parquet), settings
    )
    seconds = time.perf_counter() - started
    steps = {
        "spark_to_parquet": spark_seconds,
        **{k: v for k, v in done.items() if k != "accuracy"},
    }
    # The rest: TorchDistributor's barrier job and torchrun up to the function, and back.
    steps["launch_and_return"] = seconds - sum(steps.values())
    THEIRS_STEPS.append(steps)
    print(f"trainer_torchdistributor steps: {steps}", flush=True)
    return seconds, float(done["accuracy"])


def finetune_with_trainer(folder: str, settings: dict[str, Any]) -> dict[str, float]:
    """A TorchDistributor user's function: Parquet → tokenizer → ``Trainer`` → accuracy (and
    rank 0's seconds in each step)."""
    import time

    entered = time.perf_counter()
    import glob
    import os

    os.environ["OMP_NUM_THREADS"] = "1"  # accelerate sets the cores ÷ local ranks if unset
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(settings["pretrained"])

    class Encoded(torch.utils.data.Dataset):
        def __init__(self, split: str) -> None:
            files = sorted(glob.glob(os.path.join(folder, split, "*.parquet")))
            table = pq.ParquetDataset(files).read()
            self.inputs = tokenizer(
                table["text"].to_pylist(),
                max_length=settings["max_length"],
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            )
            self.labels = torch.from_numpy(table["label"].to_numpy().astype(np.int64))

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {**{k: v[i] for k, v in self.inputs.items()}, "labels": self.labels[i]}

    train, validation = Encoded("train"), Encoded("validation")
    set_seed(settings["seed"])  # the new head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        settings["pretrained"], num_labels=settings["num_labels"]
    )
    args = TrainingArguments(
        output_dir=settings["output_dir"],
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["eval_batch_size"],
        learning_rate=settings["lr"],
        weight_decay=settings["weight_decay"],
        optim="adamw_torch",  # torch.optim.AdamW, as ours (Trainer's default is the fused one)
        lr_scheduler_type="constant",  # ours: constant (Trainer's default decays linearly)
        max_grad_norm=0.0,  # ours clips nothing (Trainer's default clips at 1.0)
        dataloader_drop_last=True,  # ours: train.tail drop
        ddp_find_unused_parameters=False,  # as ours (Trainer's default: True, a graph walk a step)
        # The default (True) multiplies the loss by the ranks for a model whose forward takes
        # **kwargs, as BERT's does, though its mean cross-entropy ignores the item count: the
        # gradients doubled (next to nothing under AdamW) and an item-count gather every step.
        average_tokens_across_devices=False,
        seed=settings["seed"],
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=train)
    ready = time.perf_counter()
    trainer.train()
    trained = time.perf_counter()
    # Every validation row, as ours: the flag above applies to Trainer's evaluation loaders too,
    # and would drop a rank's only (partial) batch of 4096.
    trainer.args.dataloader_drop_last = False
    predicted = trainer.predict(validation)  # every rank its part, gathered over the ranks
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    right = predicted.predictions.argmax(-1) == predicted.label_ids
    return {
        "accuracy": float(right.mean()),
        "imports_data_model_trainer": ready - entered,  # torch, transformers, Parquet, tokenised
        "trainer_train": trained - ready,
        "predict": time.perf_counter() - trained,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20_000, help="topics rows (the tests: 6000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4, help="per rank (× ranks: AdamW's)")
    parser.add_argument(
        "--first", choices=["ours", "theirs"], default="ours", help="who opens round 1 (cold)"
    )
    args = parser.parse_args()
    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit(
            "transformers.Trainer needs accelerate: make bench-hf-finetune installs it "
            '(or: pip install -e ".[bench]")'
        )
    work = WORK / "bench" / "hf-finetune"
    shutil.rmtree(work, ignore_errors=True)
    bert = make_tiny_bert(work / "tiny-bert")
    cfg = config(work, bert, args.rows, args.epochs, args.lr)
    spark = spark_session(cfg.spark, app_name="lepton-spark hf-finetune")
    runs: dict[str, list[tuple[float, float]]] = {"lepton_ddp": [], "trainer_torchdistributor": []}
    order = list(runs) if args.first == "ours" else list(runs)[::-1]
    for round_ in range(args.rounds):
        # Alternating, and who goes first alternates too: round 1's opener meets the session
        # cold (Spark's first jobs, its Python workers), the machine is shared.
        for name in order if round_ % 2 == 0 else order[::-1]:
            done = ours(spark, cfg) if name == "lepton_ddp" else theirs(spark, cfg, work)
            runs[name].append(done)
            print(f"round {round_ + 1}, {name}: {done[0]:.1f} s, val/accuracy {done[1]:.4f}")
    spark.stop()
    seconds = {name: median([t for t, _ in done]) for name, done in runs.items()}
    warm = {name: median([t for t, _ in done[1:] or done]) for name, done in runs.items()}
    accuracy = {name: median([a for _, a in done]) for name, done in runs.items()}
    for name in runs:
        print(f"{name}: median {seconds[name]:.1f} s, val/accuracy {accuracy[name]:.4f}")
    comparable = min(accuracy.values()) >= MIN_ACCURACY
    if not comparable:
        print(f"WARNING: a side below val/accuracy {MIN_ACCURACY}: not the same model trained")
    theirs_name = "trainer_torchdistributor"
    paired = [t / o for (t, _), (o, _) in zip(runs[theirs_name], runs["lepton_ddp"], strict=True)]
    report(
        "hf_finetune",
        {
            "end_to_end_speedup_over_trainer_torchdistributor": seconds[theirs_name]
            / seconds["lepton_ddp"],
            # Rounds after the first, and round 1 alone (its opener, --first, met Spark cold).
            "end_to_end_speedup_warm": warm[theirs_name] / warm["lepton_ddp"],
            "end_to_end_speedup_round_1": paired[0],
            # Each round's ratio, then their median: a load spike on the shared machine moves
            # one round, where it can move a side's median of few rounds a lot.
            "end_to_end_speedup_median_of_rounds": median(paired),
        },
        {
            "end_to_end": {
                n: [{"seconds": t, "val_accuracy": a} for t, a in d] for n, d in runs.items()
            },
            "median_seconds": seconds,
            "median_seconds_warm": warm,
            "median_val_accuracy": accuracy,
            "comparable": comparable,  # both sides reached MIN_ACCURACY
            "first_round_opened_by": args.first,
            "ours_stages_s": STAGES,
            "theirs_steps_s": THEIRS_STEPS,
            "rows": args.rows,
            "epochs": args.epochs,
            "lr_per_rank": args.lr,
            "lr_adamw": args.lr * 2,
            "batch_size_per_rank": cfg.train.batch_size,
            "max_length": MAX_LENGTH,
            "ranks": 2,
            "threads_per_rank": 1,
        },
    )


if __name__ == "__main__":
    main()
