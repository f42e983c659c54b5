"""Charts: the confusion matrix (its numbers, its class selection for many classes), the
per-class IoU bars, prediction panels, and their rendering to arrays and PNG files."""

import numpy as np
import pytest
import torch
from PIL import Image

from segformer.data.labels import ADE20K_CLASSES
from segformer.inference.metrics import scores_from_confusion_matrix
from segformer.inference.pictures import (
    batch_samples,
    confusion_matrix_figure,
    figure_to_array,
    make_palette,
    most_confused_classes,
    per_class_iou_figure,
    prediction_figure,
    save_figure,
)

NAMES = ["sky", "road", "car"]
# sky: 3 right, 1 as road; road: never labelled; car: 2 as road, 2 right
CONFMAT = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]])


def _texts(figure):
    return [text.get_text() for axes in figure.axes for text in axes.texts]


def _pixel_size(figure):
    width, height = figure.get_size_inches() * figure.dpi
    return round(height), round(width)


def test_three_class_matrix_writes_row_percentages_in_its_cells():
    figure = confusion_matrix_figure(CONFMAT, NAMES)
    assert sorted(_texts(figure)) == ["25", "50", "50", "75"]  # empty cells and the unlabelled row stay blank
    (axes, _colorbar) = figure.axes
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in axes.texts}
    assert cells == {(0, 0): "75", (0, 1): "25", (2, 1): "50", (2, 2): "50"}  # (row=true, column=predicted)
    assert [t.get_text() for t in axes.get_yticklabels()] == NAMES
    assert [t.get_text() for t in axes.get_xticklabels()] == NAMES
    assert axes.get_ylabel() == "true class" and axes.get_xlabel() == "predicted class"
    shown = axes.images[0].get_array()
    assert shown.mask[1].all() and not shown.mask[[0, 2]].any()  # the never-labelled row is masked (grey)
    np.testing.assert_allclose(shown[2].data, [0, 50, 50])


def test_rendered_chart_has_the_figure_size_and_is_not_blank(tmp_path):
    figure = confusion_matrix_figure(CONFMAT, NAMES)
    image = figure_to_array(figure)
    assert image.shape == (*_pixel_size(figure), 3) and image.dtype == np.uint8
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10
    path = save_figure(figure, tmp_path / "matrix.png")
    assert Image.open(path).size == image.shape[1::-1]


def test_most_confused_classes_are_the_largest_off_diagonal_shares():
    k = 150
    counts = np.diag(np.full(k, 1000))
    counts[10, 20] = 900  # 47% of class 10 predicted as 20
    counts[30, 40] = 500
    counts[50, 60] = 100
    counts[70, 70] = 0  # class 70: never labelled
    assert most_confused_classes(counts, 4) == [10, 20, 30, 40]
    assert most_confused_classes(counts, 5) == [10, 20, 30, 40, 50]
    # Confusions run out: the other labelled classes fill the rest, the unlabelled one last.
    assert most_confused_classes(counts, 8) == [0, 1, 10, 20, 30, 40, 50, 60]
    assert most_confused_classes(counts, 149) == [c for c in range(k) if c != 70]


def test_150_class_matrix_shows_only_the_most_confused_and_says_so():
    rng = np.random.default_rng(0)
    counts = np.diag(rng.integers(500, 1000, 150)) + (rng.random((150, 150)) < 0.02) * rng.integers(1, 20, (150, 150))
    counts[3, 8] = 5000  # floor mostly predicted as windowpane
    figure = confusion_matrix_figure(counts, ADE20K_CLASSES)
    axes = figure.axes[0]
    keep = most_confused_classes(counts, 25)
    assert len(keep) == 25 and {3, 8} <= set(keep)
    assert [t.get_text() for t in axes.get_yticklabels()] == [ADE20K_CLASSES[i] for i in keep]
    assert [t.get_text() for t in axes.get_xticklabels()] == [*(ADE20K_CLASSES[i] for i in keep), "other classes"]
    assert "25 of 150 classes" in axes.get_title()
    shown = axes.images[0].get_array()
    assert shown.shape == (25, 26)
    np.testing.assert_allclose(shown.sum(axis=1), 100)  # the "other" column completes each row
    floor = keep.index(3)
    assert shown[floor, keep.index(8)] == pytest.approx(100 * 5000 / counts[3].sum())


def test_iou_chart_sorts_classes_and_marks_the_miou():
    # IoU = I / (L + P - I): a 3/(4+3-3), b 0/(0+1) (predicted, never labelled), c 2/(3+3-2), d absent
    counts = torch.tensor([[3, 0, 1, 0], [0, 0, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]])
    results = scores_from_confusion_matrix(counts)
    figure = per_class_iou_figure(results, ["a", "b", "c", "d"])
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["a", "c", "b"]  # best first, d left out
    np.testing.assert_allclose([bar.get_width() for bar in axes.patches], [75, 50, 0])
    (line,) = axes.lines
    assert line.get_xdata()[0] == pytest.approx(100 * float(results["mIoU"]))
    assert f"mIoU {100 * float(results['mIoU']):.1f}" in axes.get_title() and "1 classes absent" in axes.get_title()
    assert _texts(figure) == ["75.0", "50.0", "0.0"]


def test_batch_samples_crop_padding_and_prediction_panel():
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    pixel_values = torch.zeros(2, 3, 8, 8)
    pixel_values[0, :, :6, :4] = 200.0  # first image: 6x4 of the padded 8x8 input
    labels = torch.full((2, 12, 8), 255, dtype=torch.long)
    labels[0] = 1
    batch = {
        "names": ["first", "second"],
        "pixel_values": pixel_values,
        "labels": labels,
        "image_sizes": torch.tensor([[6, 4], [8, 8]]),
        "label_sizes": torch.tensor([[12, 8], [8, 8]]),  # the first label at twice the input's size
    }
    preds = [torch.full((12, 8), 2), torch.zeros(8, 8, dtype=torch.long)]
    (sample,) = batch_samples(batch, preds, mean, std, limit=1)
    assert sample["name"] == "first"
    assert sample["image"].shape == (12, 8, 3) and (sample["image"] == 200).all()
    assert sample["labels"].shape == (12, 8) and (sample["labels"] == 1).all()
    assert sample["pred"].dtype == np.uint8 and (sample["pred"] == 2).all()
    assert len(batch_samples(batch, preds, mean, std, limit=5)) == 2

    figure = prediction_figure(sample, make_palette(3), NAMES)
    assert [axes.get_title() for axes in figure.axes] == ["image", "ground truth", "prediction"]
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["road", "car"]  # the classes in either mask
    assert figure_to_array(figure).shape == (*_pixel_size(figure), 3)
