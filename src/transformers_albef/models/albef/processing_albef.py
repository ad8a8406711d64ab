"""Processor class for ALBEF, and the text cleaning of the original datasets."""

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from transformers import BertTokenizer
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.tokenization_utils_base import BatchEncoding, TruncationStrategy

from .image_processing_albef import AlbefImageProcessor
from .tokenization_albef import AlbefTokenizer

# The original cleaning deletes these characters, and turns hyphens and slashes into spaces.
_DELETED_CHARACTERS = re.compile(r"[,.'!?\"()*#:;~]")
_WORD_SEPARATORS = re.compile(r"[-/]")
_WHITESPACE_RUNS = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """
    Cleans a caption the way ALBEF's datasets do: lowercase, delete `,.'!?"()*#:;~`, turn `-` and `/` into
    spaces and `<person>` into `person`, collapse whitespace runs, strip, and keep the first `max_words`
    space-separated words. 30 words is used for pre-training, retrieval, NLVR2, SNLI-VE and grounding.
    """
    caption = _DELETED_CHARACTERS.sub("", caption.lower())
    caption = _WORD_SEPARATORS.sub(" ", caption).replace("<person>", "person")
    caption = _WHITESPACE_RUNS.sub(" ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def pre_question(question: str, max_words: int = 50) -> str:
    """
    Cleans a VQA question the way ALBEF's VQA dataset does: lowercase, delete `,.'!?"()*#:;~`, turn `-` and
    `/` into spaces, strip trailing spaces, and keep the first `max_words` space-separated words. Unlike
    `pre_caption` it keeps whitespace runs and `<person>`. ALBEF uses 30 words for training, 50 at test time.
    """
    question = _DELETED_CHARACTERS.sub("", question.lower())
    question = _WORD_SEPARATORS.sub(" ", question).rstrip(" ")
    return " ".join(question.split(" ")[:max_words])


_CLEANERS = {"caption": pre_caption, "question": pre_question}

# The bert-base-uncased vocabulary ships with the package, so the processor works offline.
# The package ships the vocabulary beside the model folder (a Hub repo carries its own tokenizer files instead).
BERT_VOCAB = Path(__file__).resolve().parents[2] / "resources" / "bert-base-uncased-vocab.txt"


class AlbefTextKwargs(TextKwargs, total=False):
    """
    clean_text (`"caption"`, `"question"` or `None`, *optional*, defaults to `None`):
        Apply `pre_caption` or `pre_question` to every text before tokenising. `None` tokenises the text as given.
    max_words (`int`, *optional*):
        Word limit of the cleaning; defaults to the cleaner's own (30 for captions, 50 for questions).
    allow_empty_text (`bool`, *optional*, defaults to `False`):
        Encode an empty (or all-whitespace) text as `[CLS]` alone, as the original scripts do for the empty captions
        of their datasets, instead of refusing it. A text that only the cleaning empties (`"..."` with
        `clean_text="caption"`) is always encoded so, as in the original.
    """

    clean_text: Literal["caption", "question"] | None
    max_words: int | None
    allow_empty_text: bool


class AlbefProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: AlbefTextKwargs


class AlbefProcessor(ProcessorMixin):
    r"""
    Wraps an [`AlbefImageProcessor`] and an [`AlbefTokenizer`] (the `bert-base-uncased` WordPiece vocabulary) into
    one processor, and owns ALBEF's text convention:

    - captions, questions and hypotheses are `[CLS] w1 ... wn` with **no** `[SEP]`; truncation keeps
      `max_length - 1` word pieces after the `[CLS]`;
    - VQA answers ([`~AlbefProcessor.encode_answers`]) are `[CLS] a1 ... an [SEP]`;
    - `attention_mask` is 1 on tokens and 0 on padding; `token_type_ids` are only returned on request
      (`return_token_type_ids=True`) and are all zeros.

    The convention is applied here whatever the tokenizer (an older folder's plain `BertTokenizer` too);
    [`AlbefTokenizer`] also applies it when called directly, which is what transformers' own pipelines do.

    Text defaults follow the original retrieval evaluation: `padding="longest"`, `truncation=True`,
    `max_length=30`. The original scripts call the tokenizer differently per task; to reproduce one exactly:

    | original call site | arguments |
    |---|---|
    | pre-training (Pretrain.py), VQA training questions | `max_length=25` |
    | retrieval evaluation | `padding="max_length"` (default truncation at 30) |
    | retrieval / grounding training | `truncation=False` |
    | NLVR2, SNLI-VE, grounding evaluation, VQA test questions | `truncation=False` |
    Texts are tokenised as given unless `clean_text="caption"` or `clean_text="question"` is passed, which
    applies the original dataset cleaning ([`pre_caption`] / [`pre_question`]) first. A single string is
    treated as a batch of one.

    Args:
        image_processor ([`AlbefImageProcessor`]):
            The image processor.
        tokenizer ([`AlbefTokenizer`] or [`BertTokenizer`]):
            A BERT WordPiece tokenizer with `[CLS]`, `[SEP]` and `[PAD]` tokens.
    """

    valid_processor_kwargs = AlbefProcessorKwargs
    text_kwargs = {"padding": "longest", "truncation": True, "max_length": 30}

    def __init__(self, image_processor, tokenizer, **kwargs):
        missing = [name for name in ("cls_token", "sep_token", "pad_token") if getattr(tokenizer, name) is None]
        if missing:
            raise ValueError(f"AlbefProcessor needs a tokenizer with {', '.join(missing)} set.")
        special = {
            tokenizer.cls_token,
            tokenizer.sep_token,
            tokenizer.pad_token,
            tokenizer.unk_token,
            tokenizer.mask_token,
        }
        if len(tokenizer) <= len(special - {None}):
            where = tokenizer.name_or_path or "the folder it was loaded from"
            raise ValueError(
                f"the tokenizer has only its {len(tokenizer)} special tokens, no vocabulary: its files "
                f"(tokenizer.json or vocab.txt) are missing from {where!r}. Save the processor with the model "
                "(processor.save_pretrained) or build it with AlbefProcessor.from_bert_vocab()"
            )

        if type(tokenizer) is BertTokenizer:  # a folder saved before AlbefTokenizer: same vocabulary, ALBEF's template
            tokenizer = AlbefTokenizer(
                vocab=tokenizer.get_vocab(),
                do_lower_case=tokenizer.init_kwargs.get("do_lower_case", True),
                model_max_length=tokenizer.model_max_length,
            )
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_bert_vocab(cls, image_size: int = 384, vocab_file: str | Path | None = None) -> "AlbefProcessor":
        """ALBEF's processor from a WordPiece vocabulary (default: the bundled bert-base-uncased one), no download."""

        tokenizer = AlbefTokenizer(vocab=str(vocab_file or BERT_VOCAB), model_max_length=512)
        return cls(AlbefImageProcessor(size=image_size), tokenizer)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        **kwargs: Unpack[AlbefProcessorKwargs],
    ) -> BatchFeature:
        """
        Prepares images (`pixel_values`) and/or captions or questions (`input_ids`, `attention_mask`).

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Images for [`AlbefImageProcessor`].
            text (`str` or `list[str]`, *optional*):
                Captions, questions or hypotheses, encoded as `[CLS] tokens` without `[SEP]`.
            kwargs:
                Image processor options, tokenizer-style options (`padding`, `truncation`, `max_length`,
                `pad_to_multiple_of`, `padding_side`, `return_attention_mask`, `return_token_type_ids`),
                `clean_text`, `max_words` and `return_tensors`.
        """
        if images is None and text is None:
            raise ValueError("AlbefProcessor needs `images`, `text` or both.")
        output_kwargs = self._merge_kwargs(
            AlbefProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        return_tensors = text_kwargs.get("return_tensors")

        data = {}
        if text is not None:
            data.update(self._encode(text, append_sep=False, **text_kwargs))
        if images is not None:
            data.update(self.image_processor(images, **output_kwargs["images_kwargs"]))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_answers(self, answers: str | list[str], **kwargs: Unpack[AlbefTextKwargs]) -> BatchEncoding:
        """
        Encodes VQA answers as `[CLS] a1 ... an [SEP]`, the ids the original gets by appending the string
        `"[SEP]"` to each answer. Answers are not truncated by default (as in the original); pass
        `truncation=True, max_length=...` to cut them, `[SEP]` counting as a word piece.

        Args:
            answers (`str` or `list[str]`):
                The answers, without `[SEP]`.
            kwargs:
                The text options of `__call__`; `padding` defaults to `"longest"`.
        """
        kwargs = {"padding": "longest", "truncation": False, "max_length": None, **kwargs}
        return self._encode(answers, append_sep=True, **kwargs)

    def _encode(
        self,
        text: str | list[str],
        append_sep: bool,
        padding=False,
        truncation=None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_token_type_ids: bool | None = None,
        return_tensors=None,
        clean_text: str | None = None,
        max_words: int | None = None,
        allow_empty_text: bool = False,
        add_special_tokens: bool | None = None,
        **unsupported,
    ) -> BatchEncoding:
        unsupported = sorted(name for name, value in unsupported.items() if value not in (None, False))
        if unsupported:
            raise ValueError(f"AlbefProcessor does not support these text options: {unsupported}.")
        if add_special_tokens is False:
            raise ValueError(
                "ALBEF texts always start with [CLS]; use `processor.tokenizer` directly for bare word pieces."
            )

        # Any sequence of strings (a list, or a `datasets` column); a single string is a batch of one.
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, Sequence) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"AlbefProcessor expects text as a string or a sequence of strings, got {text!r}.")
        if not texts:
            raise ValueError("AlbefProcessor got an empty list of texts.")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty and not allow_empty_text:
            raise ValueError(
                f"AlbefProcessor got empty texts at positions {empty[:10]}; every text needs words "
                "(allow_empty_text=True encodes them as [CLS] alone, as the original does)."
            )

        if clean_text is not None:
            if clean_text not in _CLEANERS:
                raise ValueError(f"`clean_text` must be 'caption', 'question' or None, got {clean_text!r}.")
            cleaner = _CLEANERS[clean_text]
            texts = [cleaner(t) if max_words is None else cleaner(t, max_words) for t in texts]

        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_length` must be at least 1 (the [CLS] token), got {max_length}.")
        truncate = truncation not in (None, False, TruncationStrategy.DO_NOT_TRUNCATE)

        # `verbose=False` when truncating: the length warning is about the untruncated word pieces.
        word_pieces = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=not truncate,
        )["input_ids"]
        if append_sep:
            word_pieces = [ids + [self.tokenizer.sep_token_id] for ids in word_pieces]

        # Like the original tokenizer, truncation counts the single special token: [CLS] + max_length - 1 pieces.
        if truncate:
            limit = (max_length if max_length is not None else self.tokenizer.model_max_length) - 1
            word_pieces = [ids[:limit] for ids in word_pieces]

        encoded = {"input_ids": [[self.tokenizer.cls_token_id] + ids for ids in word_pieces]}
        if return_token_type_ids:
            encoded["token_type_ids"] = [[0] * len(ids) for ids in encoded["input_ids"]]
        return self.tokenizer.pad(
            encoded,
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            return_tensors=return_tensors,
        )

    @property
    def unused_input_names(self) -> list[str]:
        # ALBEF never passes token_type_ids: its text encoder uses type 0 everywhere.
        return ["token_type_ids"]


AlbefProcessor.register_for_auto_class()  # saved processors name their code (auto_map)

__all__ = ["AlbefProcessor", "pre_caption", "pre_question"]
