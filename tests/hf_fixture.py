"""A tiny pretrained BERT made in the tests: a ``tokenizers`` WordPiece tokenizer over the
generated topics corpus's words, a 2-layer ``BertConfig`` of width 64, ``save_pretrained``.
What a user's ``bert-base-cased`` folder is, 1,000 times smaller; no hub access."""

from __future__ import annotations

from pathlib import Path

from lepton_spark.config.schema import GeneratedSource
from lepton_spark.data.datagen import topic_vocabulary

TOPICS = GeneratedSource(
    kind="topics",
    rows=6000,
    topics=4,
    vocabulary=400,
    min_words=8,
    max_words=24,
    seed=3,
    label_noise=0.0,
)


def corpus(source: GeneratedSource = TOPICS) -> list[str]:
    """Lines of the corpus's words (each topic's, then the common ones): the vocabulary's source."""
    own, common = topic_vocabulary(source)
    lines = [" ".join(words) for words in own] + [" ".join(common)]
    return lines * 4


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """The tiny BERT in ``folder``, the same every call: ``tokenizers``' WordPiece trainer breaks
    its ties differently each time (another vocabulary, other ids, and now and then a fine-tune
    that diverges at the tests' learning rate), so the WordPiece vocabulary is laid out here:
    the special tokens, the corpus's words (each one token), then its letters alone and as
    ``##`` continuations for the words it has never seen, in sorted order."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w.lower() for line in corpus() for w in line.split()})
    letters = sorted({c for w in words for c in w})
    tokens = [*special, *words, *letters, *(f"##{c}" for c in letters)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=128)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(folder))  # a base model, as bert-base-cased: no head
    fast.save_pretrained(str(folder))
    return folder
