"""A smaller WordPiece vocabulary cut from a BERT one, with the pretrained rows it keeps.

Half of a small BERT (all-MiniLM-L6-v2: 11.7M of its 22.7M parameters) is the 30,522-row word embedding. A model that
only ever reads short English captions needs a fraction of those rows. `select_vocabulary` keeps:
- the first 104 entries (`[PAD]`, `[unused*]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`), so every special id is unchanged;
- every single character and `##` single character of the Latin scripts, so every Latin word still splits into
  pieces and never becomes `[UNK]`;
- the `max_words` most frequent words (bert-base-uncased lists its words by frequency from id 1,996 on);
- every piece that the full vocabulary uses for `texts` (the captions the model is trained and evaluated on).
Kept entries stay in their original order. WordPiece is greedy longest-match-first, and a prefix missing from the full
vocabulary is missing from a subset of it, so a word whose pieces are all kept splits exactly as before.

`prune_bert_folder` writes a BERT folder (config, weights, vocab.txt) with only the kept rows of the word embeddings
(and of an MLM head's bias), ready for `pretrain --text-init FOLDER --vocab-file FOLDER/vocab.txt`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import BertTokenizer

FIRST_WORD_ID = 1996  # bert-base-uncased: ids 999-1995 are single characters, words follow by frequency
SPECIAL_IDS = 104  # [PAD], [unused0-98], [UNK], [CLS], [SEP], [MASK]
LATIN_END = 0x250  # Basic Latin to IPA Extensions


def _is_latin_character(token: str) -> bool:
    character = token[2:] if token.startswith("##") else token
    return len(character) == 1 and ord(character) < LATIN_END


def select_vocabulary(vocab: list[str], texts: Iterable[str], max_words: int) -> list[int]:
    """Ids of `vocab` (a BERT WordPiece vocabulary, in its order) to keep; see the module docstring."""
    if len(vocab) <= FIRST_WORD_ID:
        raise ValueError(f"expected a bert-base-style vocabulary of over {FIRST_WORD_ID} entries, got {len(vocab)}")
    if max_words < 0:
        raise ValueError(f"max_words must be >= 0, got {max_words}")
    keep = set(range(SPECIAL_IDS))
    keep.update(i for i, token in enumerate(vocab) if _is_latin_character(token))
    keep.update(range(FIRST_WORD_ID, min(len(vocab), FIRST_WORD_ID + max_words)))
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    for text in texts:
        keep.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(keep)


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(temporary)
    os.replace(temporary, path)


def prune_bert_folder(source: str | os.PathLike, destination: str | os.PathLike, keep: list[int]) -> Path:
    """Copy the BERT folder `source` (config.json, model.safetensors, vocab.txt) to `destination` with only the
    vocabulary entries `keep` (sorted ids). Returns the destination."""
    source, destination = Path(source), Path(destination)
    vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if keep != sorted(set(keep)) or not keep or keep[0] < 0 or keep[-1] >= len(vocab):
        raise ValueError(f"keep must be sorted unique ids in [0, {len(vocab)})")
    config = json.loads((source / "config.json").read_text())
    if config.get("vocab_size") != len(vocab):
        raise ValueError(f"{source}: config vocab_size {config.get('vocab_size')} != {len(vocab)} lines in vocab.txt")
    import torch

    index = torch.tensor(keep)
    state = load_file(source / "model.safetensors")
    pruned = {}
    for key, tensor in state.items():
        vocabulary_sized = key.endswith("word_embeddings.weight") or key.endswith("predictions.bias")
        pruned[key] = tensor.index_select(0, index).contiguous() if vocabulary_sized else tensor
    destination.mkdir(parents=True, exist_ok=True)
    _write_atomically(destination / "model.safetensors", lambda p: save_file(pruned, p, metadata={"format": "pt"}))
    config["vocab_size"] = len(keep)
    _write_atomically(destination / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    _write_atomically(
        destination / "vocab.txt", lambda p: p.write_text("".join(vocab[i] + "\n" for i in keep), encoding="utf-8")
    )
    return destination
