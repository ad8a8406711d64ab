"""A pruned vocabulary keeps every special id, splits every kept word exactly as the full one, never turns a Latin
word into [UNK], and the pruned BERT folder computes what the full one computes on the same text."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from transformers_albef.models.albef.processing_albef import BERT_VOCAB
from transformers_albef.training.vocabulary import SPECIAL_IDS, prune_bert_folder, select_vocabulary

VOCAB = BERT_VOCAB.read_text(encoding="utf-8").splitlines()
CAPTIONS = ["grinning face with smiling eyes", "flag: united kingdom", "man in business suit levitating", "keycap 4"]


def _ids(vocab: list[str], text: str) -> list[str]:
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_special_ids_and_caption_pieces_are_kept():
    keep = select_vocabulary(VOCAB, CAPTIONS, max_words=100)
    assert keep[:SPECIAL_IDS] == list(range(SPECIAL_IDS))
    pruned = [VOCAB[i] for i in keep]
    assert [pruned.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    for caption in CAPTIONS:
        assert _ids(pruned, caption) == _ids(VOCAB, caption)
    assert len(keep) < 600  # 104 special, ~220 Latin characters, 100 words, the captions' pieces


def test_kept_words_split_as_before_and_no_latin_word_is_unknown():
    keep = select_vocabulary(VOCAB, CAPTIONS, max_words=2000)
    pruned = [VOCAB[i] for i in keep]
    kept = set(pruned)
    checked = 0
    for word in VOCAB[1996:12000:7]:  # frequent and rarer whole words
        if word.startswith("##") or not word.isalpha():
            continue
        pieces = _ids(VOCAB, word)
        if all(p in kept for p in pieces):
            assert _ids(pruned, word) == pieces
            checked += 1
        else:  # a rarer word splits into smaller kept pieces, never [UNK]
            assert "[UNK]" not in _ids(pruned, word)
    assert checked > 200
    assert "[UNK]" not in _ids(pruned, "zyxomorphic quetzalcoatl überstraße")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="bert-base-style"):
        select_vocabulary(VOCAB[:500], CAPTIONS, 10)
    with pytest.raises(ValueError, match="max_words"):
        select_vocabulary(VOCAB, CAPTIONS, -1)


@pytest.fixture()
def tiny_bert(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    folder = tmp_path / "bert"
    BertModel(config).eval().save_pretrained(folder)
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in VOCAB), encoding="utf-8")
    return folder


def test_pruned_folder_computes_what_the_full_one_does(tiny_bert, tmp_path):
    keep = select_vocabulary(VOCAB, CAPTIONS, max_words=300)
    pruned = prune_bert_folder(tiny_bert, tmp_path / "pruned", keep)
    assert json.loads((pruned / "config.json").read_text())["vocab_size"] == len(keep)
    assert not list(pruned.glob(".*tmp*"))  # written through temporary siblings, renamed
    full_model, small_model = BertModel.from_pretrained(tiny_bert).eval(), BertModel.from_pretrained(pruned).eval()
    full_tok, small_tok = BertTokenizer.from_pretrained(tiny_bert), BertTokenizer.from_pretrained(pruned)
    for caption in CAPTIONS:
        full_ids, small_ids = full_tok(caption, return_tensors="pt"), small_tok(caption, return_tensors="pt")
        assert not torch.equal(full_ids["input_ids"], small_ids["input_ids"])  # other ids ...
        with torch.no_grad():  # ... same rows, same computation
            expected = full_model(**full_ids).last_hidden_state
            actual = small_model(**small_ids).last_hidden_state
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_prune_refuses_unsorted_or_out_of_range_ids(tiny_bert, tmp_path):
    for keep in ([5, 3], [], [0, len(VOCAB)]):
        with pytest.raises(ValueError, match="sorted unique ids"):
            prune_bert_folder(tiny_bert, tmp_path / "out", keep)
    assert not (tmp_path / "out").exists()
