"""Grounding pictures and result grids (`transformers_albef.visualization`): sizes, blending, word-piece merging,
and `ground` end to end with the bundled retrieval model, written to PNG and read back."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import transformers_albef as ta
from transformers_albef import visualization as viz


def picture(size=(64, 48), colour=(200, 200, 200)):
    return Image.new("RGB", size, colour)


def test_overlay_upsamples_the_map_to_the_image_and_blends():
    image = picture((80, 40))
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0  # hot top-left patch
    out = np.asarray(viz.overlay_heatmap(image, heat)).astype(int)
    assert out.shape == (40, 80, 3)
    top_left, bottom_right = out[2, 2], out[-3, -3]
    assert top_left[0] > 100 and top_left[2] < 100  # red-ish where the map is hot
    assert (bottom_right == 200).all()  # untouched where it is cold (blend weight 0)
    flat = np.asarray(viz.overlay_heatmap(image, np.ones((4, 4))))
    assert (flat == 200).all()  # a flat map normalises to 0: nothing to show


def test_jet_colours_and_other_maps():
    colours = viz.colorize(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(colours[0], [0, 0, 0.5], rtol=0, atol=1e-6)  # dark blue: the ramp's exact end
    np.testing.assert_allclose(colours[2], [0.5, 0, 0], rtol=0, atol=1e-6)  # dark red
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(ValueError, match="needs matplotlib"):
            viz.colorize(np.zeros(2), cmap="viridis")


def test_word_pieces_merge_into_words():
    tokens = ["[CLS]", "una", "##ffa", "##ble", "dog", "[PAD]"]
    maps = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 2, 2)
    merged = viz.merge_word_pieces(tokens, maps, special_tokens=["[CLS]", "[PAD]"])
    assert [word for word, _ in merged] == ["unaffable", "dog"]
    np.testing.assert_allclose(merged[0][1], np.full((2, 2), 2.0))  # mean of the pieces' maps 1, 2, 3
    np.testing.assert_allclose(merged[1][1], np.full((2, 2), 4.0))


def test_grid_layout_and_labels():
    images = [picture(), picture((30, 90)), picture(), picture(), picture()]
    labels = ["short", "a much longer label that wraps over a few lines of the panel", "", "x", "y"]
    grid = viz.image_grid(images, labels, columns=3, panel_size=80, title="Results")
    margin = max(6, 80 // 12)
    assert grid.width == 3 * (80 + margin) + margin
    assert grid.height > 2 * 80 + 2 * 20  # two rows of panels, their labels, the title
    one_row = viz.image_grid(images[:2], columns=6, panel_size=80)
    assert one_row.width == 2 * (80 + margin) + margin  # never wider than the pictures need
    stacked = viz.stack_vertically([grid, one_row], gap=5)
    assert stacked.size == (grid.width, grid.height + one_row.height + 5)
    with pytest.raises(ValueError, match="labels"):
        viz.image_grid(images, labels[:2])
    with pytest.raises(ValueError, match="at least one"):
        viz.image_grid([])


def test_grounding_figure_panels():
    heat = np.random.default_rng(0).random((4, 4))
    words = [("red", heat), ("circle", heat * 2), ("flat", np.zeros((4, 4)))]
    figure = viz.grounding_figure(picture(), heat, words, text="red circle flat", score=0.5, panel_size=64)
    assert figure.width == 5 * (64 + 6) + 6  # image, whole text, three words: one row


def test_ground_with_the_bundled_model(tmp_path):
    path = ta.bundled_model_path("retrieval")
    model = ta.AlbefForRetrieval.from_pretrained(path)
    processor = ta.AlbefProcessor.from_pretrained(path)
    image = Image.new("RGB", (120, 90), "white")
    layer = model.config.text_config.fusion_layer  # the first fusion layer: every word's map is non-zero there
    result = viz.ground(model, processor, image, "An unaffable dog.", layer=layer, panel_size=96, columns=4)
    assert result.text == "an unaffable dog" and result.words == ["an", "unaffable", "dog"]
    grid = model.config.vision_config.grid_size
    assert all(heat.shape == (grid, grid) for heat in [result.phrase_map, *result.word_maps])
    assert 0.0 <= result.match_probability <= 1.0
    saved = result.save(tmp_path / "figures" / "dog.png")
    with Image.open(saved) as reread:
        assert reread.format == "PNG"
        assert reread.width == 4 * (96 + 8) + 8  # 5 panels, 4 to a row
        assert reread.height > 2 * 96

    itc = viz.ground(model, processor, image, "a dog", mode="itc")
    assert itc.words == [] and itc.match_probability is None
    with pytest.raises(ValueError, match="empty"):
        viz.ground(model, processor, image, " ?! ")
