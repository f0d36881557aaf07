"""Pretrained Hugging Face transformers: the tokenizer on the executors, the model on the ranks.

``model: {name: hf, pretrained: PATH}`` fine-tunes a sequence classifier
(``AutoModelForSequenceClassification``) from a folder saved with ``save_pretrained`` (config,
weights, a *fast* tokenizer), on a local path or an object-store URI (``s3://...``: copied once
per process into a local cache folder). Nothing is fetched from the Hugging Face hub: the
libraries run offline (``HF_HUB_OFFLINE``) and a path that is not a folder with a config is an
error naming it.

The text feature is tokenised on Spark's executors with that model's own tokenizer
(:func:`encode`, batched over Arrow columns by ``data/text.hf_token_ids``): ``[CLS] ... [SEP]``,
cut or padded with the tokenizer's pad id to ``max_length``; the shards hold the ids
(``t:<name>``). The attention mask is ``ids != pad id``, made on the rank
(:class:`HFClassifier`), so the shards carry one column, not two: lossless for text, where the
pad token never occurs. The model is :class:`lepton_spark.models.HFClassifier` (FSDP shards the
encoder's layers: the model's ``_no_split_modules``). This module imports neither torch nor
transformers until asked (the executors tokenising text import no torch).
The served model carries the config and the tokenizer (:func:`save_parts`), so it predicts from
raw text anywhere. No Spark, no MLflow.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lepton_spark.errors import ConfigError
from lepton_spark.shards.storage import locate

PARTS = "hf"  # the served network's subfolder with the config and the tokenizer
_CACHE = Path(tempfile.gettempdir()) / "lepton-hf"


def offline() -> None:
    """No hub access from here on (the libraries read these when they are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@functools.lru_cache(maxsize=8)
def local_folder(where: str) -> Path:
    """``where`` as a local folder: itself, or an object store's folder copied once here."""
    place = locate(where)
    if place.is_local:
        folder = Path(place.path)
    else:
        import hashlib

        import pyarrow.fs as pafs

        folder = _CACHE / hashlib.sha256(place.uri.encode()).hexdigest()[:16]
        if not (folder / "config.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix="copy-", dir=_mkdir(_CACHE)))
            pafs.copy_files(place.path, str(staging), source_filesystem=place.fs)
            if folder.exists():  # another process of this host copied it meanwhile
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.rename(folder)
    if not (folder / "config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ConfigError(
            f"model.pretrained {where!r}: not a folder saved with save_pretrained (no "
            "config.json or tokenizer.json in it); lepton-spark reads pretrained models from "
            "a path or an object-store URI, never from the Hugging Face hub"
        )
    return folder


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.lru_cache(maxsize=8)
def load_tokenizer(where: str) -> Any:
    """The fast tokenizer saved in ``where`` (once per process)."""
    offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(local_folder(where)), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"the tokenizer at {where!r} is not a fast (Rust) tokenizer: save one with "
            "tokenizer.json (PreTrainedTokenizerFast.save_pretrained)"
        )
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer at {where!r} has no pad token")
    return tokenizer


def tokenizer_facts(where: str) -> tuple[int, int]:
    """(vocabulary size, pad id) of the tokenizer at ``where``."""
    tokenizer = load_tokenizer(where)
    return len(tokenizer), int(tokenizer.pad_token_id)


def encode(where: str, texts: list[str | None], max_length: int) -> np.ndarray:
    """Token ids ``[rows, max_length]`` int64: the tokenizer's own special tokens, cut, padded."""
    tokenizer = load_tokenizer(where)
    if not texts:
        return np.zeros((0, max_length), dtype=np.int64)
    out = tokenizer(
        [t or "" for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return np.asarray(out["input_ids"], dtype=np.int64)


def decode(where: str, ids: np.ndarray) -> list[str]:
    return list(load_tokenizer(where).batch_decode(ids, skip_special_tokens=True))


def save_parts(network: Any, folder: Path) -> None:
    """The config and the tokenizer of an ``HFClassifier`` into ``folder`` (the served
    network's ``hf/``), so it loads and tokenises where ``pretrained`` is not reachable."""
    folder.mkdir(parents=True, exist_ok=True)
    network.net.config.save_pretrained(str(folder))
    load_tokenizer(network.pretrained).save_pretrained(str(folder))
