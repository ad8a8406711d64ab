"""Retrieval evaluation as the original `Retrieval.py::evaluation`: ITC cosine similarities select the top-k of each
row, the ITM "match" logit re-scores them, and every other entry is -100."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def encode_for_retrieval(model, pixel_values, input_ids, attention_mask, batch_size: int = 256):
    """Tower outputs and normalised ITC embeddings of every image and text, in batches."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    # Batches move to the model's device one at a time: a whole evaluation set need not fit there.
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    text_states, text_embeds = [], []
    for start in range(0, input_ids.shape[0], batch_size):
        states = model.text_model(
            input_ids[start : start + batch_size], attention_mask[start : start + batch_size], mode="text"
        ).last_hidden_state
        text_states.append(states)
        text_embeds.append(F.normalize(model.text_proj(states[:, 0]), dim=-1))
    image_states, image_embeds = [], []
    for start in range(0, pixel_values.shape[0], batch_size):
        states = model.vision_model(pixel_values[start : start + batch_size].to(device)).last_hidden_state
        image_states.append(states)
        image_embeds.append(F.normalize(model.vision_proj(states[:, 0]), dim=-1))
    return (
        torch.cat(image_states),
        torch.cat(image_embeds),
        torch.cat(text_states),
        torch.cat(text_embeds),
        attention_mask,
    )


@torch.no_grad()
def retrieval_score_matrices(model, pixel_values, input_ids, attention_mask, k: int):
    """(score_i2t (images, texts), score_t2i (texts, images)) exactly as the original evaluation."""
    image_states, image_embeds, text_states, text_embeds, text_mask = encode_for_retrieval(
        model, pixel_values, input_ids, attention_mask
    )
    num_images, num_texts = image_states.shape[0], text_states.shape[0]
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    sims = image_embeds @ text_embeds.t()

    score_i2t = torch.full((num_images, num_texts), -100.0, device=sims.device)
    k_texts = min(k, num_texts)
    for i in range(num_images):
        _, top = sims[i].topk(k_texts)
        logits = model.itm_logits(text_states[top], text_mask[top], image_states[i].expand(k_texts, -1, -1))
        score_i2t[i, top] = logits[:, 1].float()

    score_t2i = torch.full((num_texts, num_images), -100.0, device=sims.device)
    k_images = min(k, num_images)
    sims_t = sims.t()
    for t in range(num_texts):
        _, top = sims_t[t].topk(k_images)
        logits = model.itm_logits(
            text_states[t].expand(k_images, -1, -1), text_mask[t].expand(k_images, -1), image_states[top]
        )
        score_t2i[t, top] = logits[:, 1].float()
    return score_i2t, score_t2i


def recall_at_k(score_i2t, score_t2i, txt2img, img2txt) -> dict[str, float]:
    """The original `itm_eval`: R@1/5/10 in both directions (an image counts as found when any of its captions is
    ranked that high), their means and `r_mean`, in percent."""
    import numpy as np

    score_i2t, score_t2i = np.asarray(score_i2t), np.asarray(score_t2i)
    ranks = np.zeros(score_i2t.shape[0])
    for i, scores in enumerate(score_i2t):
        order = np.argsort(scores)[::-1]
        ranks[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    tr = [100.0 * np.mean(ranks < n) for n in (1, 5, 10)]
    ranks = np.zeros(score_t2i.shape[0])
    for t, scores in enumerate(score_t2i):
        order = np.argsort(scores)[::-1]
        ranks[t] = np.where(order == txt2img[t])[0][0]
    ir = [100.0 * np.mean(ranks < n) for n in (1, 5, 10)]
    result = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": sum(tr) / 3}
    result.update({"img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": sum(ir) / 3})
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result
