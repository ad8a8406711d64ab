"""Retrieval evaluation as the original `Retrieval.py::evaluation`: ITC cosine similarities select the top-k of each
row, the ITM "match" logit re-scores them, and every other entry is -100.

- `retrieval_score_matrices` is the original loop, row by row over whole-corpus tower states (the reference);
- `chunked_retrieval_score_matrices` gives the same matrices in bounded memory: image chunks whose tower states are
  computed once, each candidate pair fused once, the work split across torch.distributed processes;
- `recall_at_k` is the original `itm_eval`.

The corpus index and search engine built on these are in `retrieval_index.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

SCORE_MODES = ("itm", "itm+itc", "itc")
# Images per block of the ITC similarity matrix: 4096 x 25K captions is 400 MB in float32.
SIMILARITY_BLOCK_SIZE = 4096


@torch.no_grad()
def retrieval_score_matrices(model, pixel_values, input_ids, attention_mask, k: int):
    """(score_i2t (images, texts), score_t2i (texts, images)) exactly as the original evaluation (the whole corpus in
    memory; `chunked_retrieval_score_matrices` bounds it). The model's own `retrieval_scores`."""
    return model.retrieval_scores(pixel_values, input_ids, attention_mask, k=k)


# ----- shared by the bounded evaluation and the search engine --------------------------------------------------------
def _image_tower(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states, normalised ITC embeddings) of a batch of images."""
    states = model.vision_model(pixel_values.to(model.device)).last_hidden_state
    return states, F.normalize(model.vision_proj(states[:, 0]), dim=-1)


def _text_tower(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder states, normalised ITC embeddings) of a batch of texts."""
    states = model.text_model(input_ids.to(model.device), attention_mask.to(model.device), mode="text")
    states = states.last_hidden_state
    return states, F.normalize(model.text_proj(states[:, 0]), dim=-1)


def _match_logits(model, image_states, image_rows, text_states, text_mask, text_rows, batch_size: int) -> torch.Tensor:
    """ITM "match" logits (float32, on the CPU) of the pairs (image_states[image_rows[j]], text_states[text_rows[j]]),
    grouped by image, about `batch_size` texts per fusion forward (text states may live on another device than the
    model's, e.g. the CPU)."""
    length = text_states.shape[1]
    logits = model.itm_logits_for_pairs(
        image_states, text_states, text_mask, image_rows, text_rows, max_query_tokens=batch_size * length
    )
    return logits[:, 1].float().cpu()  # one device-to-host copy per image chunk


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode (no dropout) and no gradients for the duration, then the model's own mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _TensorPixels:
    """Pixel values already in a tensor, read by range."""

    def __init__(self, pixel_values: torch.Tensor):
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {got}")
        self.pixel_values = pixel_values

    def __len__(self) -> int:
        return len(self.pixel_values)

    def get(self, start: int, stop: int) -> torch.Tensor:
        return self.pixel_values[start:stop]


def _image_states_in_batches(model, pixels, start: int, stop: int, batch_size: int) -> torch.Tensor:
    """Image tower states of images [start, stop) of `pixels` (anything with `get(start, stop) -> pixel values`)."""
    return torch.cat(
        [_image_tower(model, pixels.get(b, min(b + batch_size, stop)))[0] for b in range(start, stop, batch_size)]
    )


# ----- distributed ---------------------------------------------------------------------------------------------------
class _Processes:
    """The processes sharing an evaluation: torch.distributed when it is initialised with more than one process
    (torchrun, or `accelerate launch` once an `Accelerator` / `PartialState` exists), else just this one."""

    def __init__(self, distributed: bool | None, device: torch.device):
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not active:
            raise ValueError(
                "distributed=True but torch.distributed is not initialised with several processes; launch with "
                "torchrun or `accelerate launch` and create the Accelerator / PartialState first"
            )
        self.active = active if distributed is None else bool(distributed)
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        # NCCL only moves device tensors; gloo works on CPU tensors.
        self.device = device if self.active and dist.get_backend() == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> tuple[int, int]:
        """This process's contiguous part of `count` items (the original's `step = n // world + 1` split)."""
        step = math.ceil(count / self.world_size)
        return min(self.rank * step, count), min((self.rank + 1) * step, count)

    def balanced_share(self, weights: torch.Tensor) -> tuple[int, int]:
        """This process's contiguous part of the items, cut so that every process gets about the same total weight."""
        if self.world_size == 1:
            return 0, len(weights)
        cumulative = torch.cumsum(weights, 0).double()
        targets = torch.tensor([cumulative[-1].item() * r / self.world_size for r in range(self.world_size + 1)])
        bounds = torch.searchsorted(cumulative, targets, right=True).tolist()
        bounds[0], bounds[-1] = 0, len(weights)
        return bounds[self.rank], bounds[self.rank + 1]

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` concatenated along dim 0 in rank order (sizes may differ), on every process."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        local = tensor.to(self.device)
        size = torch.tensor([local.shape[0]], device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        largest = max(int(s) for s in sizes)
        padded = torch.zeros((largest, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(s)] for part, s in zip(parts, sizes)]).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` (same shape everywhere) on every process."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        local = tensor.to(self.device).contiguous()
        dist.broadcast(local, src=0)
        return local.to(tensor.device)


# ----- the bounded-memory evaluation ---------------------------------------------------------------------------------
def _progress(total: int | None, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


def _top_candidates(image_embeds, text_embeds, k_texts: int, k_images: int, block_size: int):
    """ITC top-k both ways, `(i2t_sims, i2t_top, t2i_sims, t2i_top)`, from similarities computed `block_size` images
    at a time (never the whole images x texts matrix when it is larger); a running top-k merges the t2i columns."""
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    i2t_sims, i2t_top = [], []
    t2i_sims = text_embeds.new_empty((num_texts, 0))
    t2i_top = torch.empty((num_texts, 0), dtype=torch.long, device=text_embeds.device)
    for start in range(0, num_images, block_size):
        sims = image_embeds[start : start + block_size] @ text_embeds.t()
        values, top = sims.topk(k_texts, dim=1)
        i2t_sims.append(values)
        i2t_top.append(top)
        columns = torch.arange(start, start + sims.shape[0], device=sims.device).expand(num_texts, -1)
        merged, merged_index = torch.cat([t2i_sims, sims.t()], 1), torch.cat([t2i_top, columns], 1)
        values, order = merged.topk(min(k_images, merged.shape[1]), dim=1)
        t2i_sims, t2i_top = values, merged_index.gather(1, order)
    return torch.cat(i2t_sims), torch.cat(i2t_top), t2i_sims, t2i_top


def _check_score_mode(score: str) -> None:
    if score not in SCORE_MODES:
        raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")


def _check_itm_head(model, score: str) -> None:
    if score != "itc" and not hasattr(model, "itm_head"):
        raise ValueError(
            f"score={score!r} re-ranks with the ITM head, which {type(model).__name__} does not have; load an "
            "AlbefForRetrieval checkpoint or use score='itc'"
        )


@torch.no_grad()
def _score_matrices(
    model,
    pixels,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k: int,
    score: str,
    batch_size: int,
    image_chunk_size: int,
    fusion_batch_size: int,
    similarity_block_size: int,
    distributed: bool | None,
    progress: bool,
    text_state_device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_images, num_texts = len(pixels), input_ids.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"the evaluation needs images and texts, got {num_images} images and {num_texts} texts")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, value in (
        ("batch_size", batch_size),
        ("image_chunk_size", image_chunk_size),
        ("fusion_batch_size", fusion_batch_size),
        ("similarity_block_size", similarity_block_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    _check_score_mode(score)
    _check_itm_head(model, score)
    processes = _Processes(distributed, model.device)
    show = progress and processes.is_main

    # 1. ITC embeddings: each process encodes its share of the images and texts, then every process has all of them.
    start, stop = processes.share(num_images)
    bar = _progress(stop - start, "ITC image embeddings", "image", show)
    image_embeds = [model.vision_proj.weight.new_empty((0, model.config.embed_dim))]
    for b in range(start, stop, batch_size):
        image_embeds.append(_image_tower(model, pixels.get(b, min(b + batch_size, stop)))[1])
        bar.update(image_embeds[-1].shape[0])
    bar.close()
    image_embeds = processes.gather(torch.cat(image_embeds)).to(model.device)
    start, stop = processes.share(num_texts)
    text_embeds = [model.text_proj.weight.new_empty((0, model.config.embed_dim))]
    for b in range(start, stop, batch_size):
        end = min(b + batch_size, stop)
        text_embeds.append(_text_tower(model, input_ids[b:end], attention_mask[b:end])[1])
    text_embeds = processes.gather(torch.cat(text_embeds)).to(model.device)

    # 2. The ITC top-k of every row, both ways; rank 0's choice is everyone's, so no pair is lost between processes.
    k_texts, k_images = min(k, num_texts), min(k, num_images)
    i2t_sims, i2t_top, t2i_sims, t2i_top = _top_candidates(
        image_embeds, text_embeds, k_texts, k_images, similarity_block_size
    )
    i2t_sims, i2t_top = processes.broadcast(i2t_sims).cpu().float(), processes.broadcast(i2t_top).cpu()
    t2i_sims, t2i_top = processes.broadcast(t2i_sims).cpu().float(), processes.broadcast(t2i_top).cpu()
    i2t_keys = torch.arange(num_images)[:, None] * num_texts + i2t_top
    t2i_keys = t2i_top * num_texts + torch.arange(num_texts)[:, None]

    score_i2t = torch.full((num_images, num_texts), -100.0)
    score_t2i = torch.full((num_texts, num_images), -100.0)
    if score == "itc":
        return score_i2t.scatter_(1, i2t_top, i2t_sims), score_t2i.scatter_(1, t2i_top, t2i_sims)

    # 3. Every candidate pair once, keyed image * num_texts + text: sorted keys group the pairs by image.
    pair_keys = torch.unique(torch.cat([i2t_keys.flatten(), t2i_keys.flatten()]))
    pair_images, pair_texts = pair_keys // num_texts, pair_keys % num_texts

    # 4. This process's images: contiguous, cut so that every process fuses about as many pairs.
    first, last = processes.balanced_share(torch.bincount(pair_images, minlength=num_images))
    low, high = torch.searchsorted(pair_images, torch.tensor([first, last])).tolist()
    local_scores = _fuse_pairs_by_image_chunk(
        model,
        pair_images[low:high],
        pair_texts[low:high],
        lambda chunk: _image_states_in_batches(model, pixels, int(chunk[0]), int(chunk[-1]) + 1, batch_size),
        lambda texts: _text_tower(model, input_ids[texts], attention_mask[texts])[0],
        attention_mask,
        image_chunk_size,
        batch_size,
        fusion_batch_size,
        show,
        text_state_device,
    )
    # 5. The processes' parts are consecutive runs of the sorted pairs.
    pair_scores = processes.gather(local_scores)

    i2t_scores = pair_scores[torch.searchsorted(pair_keys, i2t_keys)]
    t2i_scores = pair_scores[torch.searchsorted(pair_keys, t2i_keys)]
    if score == "itm+itc":  # LAVIS adds the ITC similarity of the candidate
        i2t_scores, t2i_scores = i2t_scores + i2t_sims, t2i_scores + t2i_sims
    return score_i2t.scatter_(1, i2t_top, i2t_scores), score_t2i.scatter_(1, t2i_top, t2i_scores)


def _fuse_pairs_by_image_chunk(
    model,
    pair_images: torch.Tensor,
    pair_texts: torch.Tensor,
    image_states_of: Callable[[torch.Tensor], torch.Tensor],
    text_states_of: Callable[[torch.Tensor], torch.Tensor],
    attention_mask: torch.Tensor,
    image_chunk_size: int,
    batch_size: int,
    fusion_batch_size: int,
    show_progress: bool,
    text_state_device: str | torch.device | None = None,
) -> torch.Tensor:
    """
    ITM match logits of the pairs (pair_images[j], pair_texts[j]), with pairs sorted by image. Images are taken
    `image_chunk_size` distinct images at a time: `image_states_of(sorted image indices)` gives their tower states
    once, and every pair of the chunk is fused. Text states (`text_states_of(text indices)`) are computed once for
    all the texts involved, `batch_size` at a time, and kept on `text_state_device` (default: the model's device).
    """
    scores = torch.empty(len(pair_images), dtype=torch.float32)
    if len(pair_images) == 0:
        return scores
    device = text_state_device or model.device
    texts = torch.unique(pair_texts)
    text_states = [text_states_of(texts[b : b + batch_size]).to(device) for b in range(0, len(texts), batch_size)]
    text_states = torch.cat(text_states)
    text_mask = attention_mask[texts].to(device)
    text_rows = torch.searchsorted(texts, pair_texts)
    images = torch.unique_consecutive(pair_images)
    bar = _progress(len(pair_images), "ITM re-ranking", "pair", show_progress)
    for start in range(0, len(images), image_chunk_size):
        chunk = images[start : start + image_chunk_size]
        low, high = torch.searchsorted(pair_images, torch.stack([chunk[0], chunk[-1] + 1])).tolist()
        image_states = image_states_of(chunk)
        image_rows = torch.searchsorted(chunk, pair_images[low:high])
        scores[low:high] = _match_logits(
            model, image_states, image_rows, text_states, text_mask, text_rows[low:high], fusion_batch_size
        )
        bar.update(high - low)
    bar.close()
    return scores


def chunked_retrieval_score_matrices(
    model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    k: int,
    score: str = "itm",
    batch_size: int = 256,
    image_chunk_size: int = 256,
    fusion_batch_size: int = 256,
    similarity_block_size: int = SIMILARITY_BLOCK_SIZE,
    distributed: bool | None = None,
    progress: bool = False,
    text_state_device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(score_i2t (images, texts), score_t2i (texts, images))` of the original evaluation (`retrieval_score_matrices`)
    with bounded memory: ITC top-`k` both ways (`k` is capped at the number of texts / images, as there), then each
    distinct candidate pair is fused once, `image_chunk_size` images' tower states at a time, `fusion_batch_size`
    pairs per forward. Entries outside a row's top-k are -100. `score="itm+itc"` adds the ITC similarity (LAVIS),
    `"itc"` skips the re-ranking.

    Memory: the corpus's ITC embeddings, one `similarity_block_size` x texts block of similarities, the top-k indices,
    the text-encoder states of the captions involved (on `text_state_device`, default the model's device; "cpu" keeps
    them off the accelerator), one chunk of image states and one fusion batch, plus the two dense result matrices on
    the CPU. For 5K images x 25K captions at k=256 (ViT-B/16 at 384 px, BERT-base): ~0.5 GB per image chunk of 256,
    ~2.3 GB of caption states, 2 x 0.5 GB of results.

    Under torch.distributed with several processes (or `distributed=True`), call it on every process: each encodes
    a share of the ITC embeddings and fuses the pairs of a contiguous range of images (balanced by pair count); every
    process returns the full matrices. Results are on the CPU, float32.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; "
            "expected the same"
        )
    with _evaluating(model):
        return _score_matrices(
            model,
            _TensorPixels(pixel_values),
            input_ids.cpu(),
            attention_mask.cpu(),
            k,
            score,
            batch_size,
            image_chunk_size,
            fusion_batch_size,
            similarity_block_size,
            distributed,
            progress,
            text_state_device,
        )


def retrieval_ranks(score_i2t, score_t2i, txt2img, img2txt):
    """`(image_ranks, text_ranks)` as the original `itm_eval` computes them (0 = ranked first): for each image the best
    position of any of its captions in its row of `score_i2t`, for each text the position of its image in its row of
    `score_t2i` (rows sorted by decreasing score)."""
    import numpy as np

    score_i2t, score_t2i = np.asarray(score_i2t), np.asarray(score_t2i)
    image_ranks = np.zeros(score_i2t.shape[0])
    for i, scores in enumerate(score_i2t):
        order = np.argsort(scores)[::-1]
        image_ranks[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    text_ranks = np.zeros(score_t2i.shape[0])
    for t, scores in enumerate(score_t2i):
        order = np.argsort(scores)[::-1]
        text_ranks[t] = np.where(order == txt2img[t])[0][0]
    return image_ranks, text_ranks


def recall_at_k(score_i2t, score_t2i, txt2img, img2txt) -> dict[str, float]:
    """The original `itm_eval`: R@1/5/10 in both directions (an image counts as found when any of its captions is
    ranked that high), their means and `r_mean`, in percent."""
    import numpy as np

    image_ranks, text_ranks = retrieval_ranks(score_i2t, score_t2i, txt2img, img2txt)
    tr = [100.0 * np.mean(image_ranks < n) for n in (1, 5, 10)]
    ir = [100.0 * np.mean(text_ranks < n) for n in (1, 5, 10)]
    result = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": sum(tr) / 3}
    result.update({"img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": sum(ir) / 3})
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


@torch.no_grad()
def match_probabilities(model, pixel_values, input_ids, attention_mask) -> dict[str, torch.Tensor]:
    """ITM calibration on aligned pairs (image i, text i): p(match) of each true pair, and of its hardest negatives,
    the text j != i most similar to image i by ITC (`hardest_text`) and the image j != i most similar to text i
    (`hardest_image`), as ALBEF mines its ITM negatives. A calibrated model puts true pairs above 0.5 and hardest
    negatives below. Texts that are equal to text i are not negatives and are never chosen. Returns `(pairs,)`
    tensors `positive`, `hardest_text`, `hardest_image`."""
    n = pixel_values.shape[0]
    if n < 2 or input_ids.shape[0] != n:
        raise ValueError(
            f"match_probabilities needs at least 2 aligned pairs, got {n} images and {input_ids.shape[0]} texts"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with _evaluating(model):
        image_states, image_embeds = _image_tower(model, pixel_values)
        text_states, text_embeds = _text_tower(model, input_ids, attention_mask)
        similarity = image_embeds @ text_embeds.t()
        same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1) & (
            attention_mask[:, None, :] == attention_mask[None, :, :]
        ).all(-1)
        similarity = similarity.masked_fill(same_text.to(similarity.device), float("-inf"))
        rows = torch.arange(n, device=similarity.device)
        hardest_text = similarity.argmax(1)
        hardest_image = similarity.argmax(0)
        image_index = torch.cat([rows, rows, hardest_image])
        text_index = torch.cat([rows, hardest_text, rows])
        logits = model.itm_logits_for_pairs(
            image_states, text_states, attention_mask.to(model.device), image_index, text_index
        )
    p = logits.float().softmax(-1)[:, 1].cpu()
    return {"positive": p[:n], "hardest_text": p[n : 2 * n], "hardest_image": p[2 * n :]}
