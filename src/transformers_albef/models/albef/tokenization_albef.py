"""ALBEF's tokenizer: BERT's WordPiece, with ALBEF's text convention built in."""

from tokenizers import processors
from transformers import BertTokenizer


class AlbefTokenizer(BertTokenizer):
    """
    The bert-base-uncased WordPiece tokenizer with ALBEF's convention: a caption, question or hypothesis is
    `[CLS] tokens` with **no** `[SEP]` (the text encoder was trained so), and ALBEF never uses token type ids. A pair
    is `[CLS] A [SEP] B [SEP]`, as BERT's. Any pipeline or code that calls the tokenizer directly gets ALBEF's ids;
    [`AlbefProcessor`] adds the original datasets' text cleaning and the answers' `[SEP]`.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Set on every construction: a reloaded tokenizer.json would otherwise get BERT's template back.
        special = [(str(self.cls_token), self.cls_token_id), (str(self.sep_token), self.sep_token_id)]
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{self.cls_token}:0 $A:0",
            pair=f"{self.cls_token}:0 $A:0 {self.sep_token}:0 $B:1 {self.sep_token}:1",
            special_tokens=special,
        )

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 1


AlbefTokenizer.register_for_auto_class("AutoTokenizer")  # saved tokenizers name their code (auto_map)


__all__ = ["AlbefTokenizer"]
