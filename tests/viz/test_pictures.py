"""Pictures: attention cropped to the item with labels, confusion with class names, training curves."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from quackae.core.errors import QuackError
from quackae.viz.curves import WIDTH, read_metrics, write_curves
from quackae.viz.render import _colour, attention_image, confusion_image, heatmap_image, save_png, token_labels


def _weights(steps: int, tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(tokens), size=steps).astype(np.float32)  # (S, T)


def _saved(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    save_png(image, buffer)
    buffer.seek(0)
    return Image.open(buffer)


def test_attention_is_cropped_to_the_item_and_written_with_its_size():
    padded = np.zeros((11, 9), dtype=np.float32)  # the batch's width: 9 tokens, 11 steps
    item = _weights(5, 4)
    padded[:5, :4] = item
    inputs, outputs = ["The", "_duck", "_swims", "[EOS]"], ["The", "_duck", "_swam", "_off", "[EOS]"]
    image = _saved(attention_image(padded, inputs, outputs))
    assert image.format == "PNG" and image.text["cells"] == "5x4"
    # the obvious reference: the same picture drawn from the item's own weights alone
    reference = attention_image(item, inputs, outputs)
    assert image.size == reference.size
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(reference))
    # one more input token makes the map exactly one cell wider
    wider = _weights(5, 5)
    assert attention_image(wider, [*inputs, "x"], outputs, cell=32).width - reference.width == 32 + 4 * (32 - 28)


def test_attention_cells_show_the_weights_on_a_fixed_scale():
    weights = np.array([[1.0, 0.0], [0.25, 0.75]], dtype=np.float32)
    image = np.asarray(attention_image(weights, ["a", "b"], ["c", "d"], cell=30))
    # find the map: the top-left cell has weight 1 -> the ramp's top colour
    top = tuple(_colour(np.array(1.0)))
    ys, xs = np.nonzero(np.all(image == top, axis=-1))
    assert ys.size, "no cell with the colour of weight 1"
    y0, x0 = ys.min(), xs.min()
    for (r, c), w in np.ndenumerate(weights):
        centre = image[y0 + r * 30 + 15, x0 + c * 30 + 15]
        assert tuple(centre) == tuple(_colour(np.array(w))), (r, c)


def test_an_item_of_a_padded_batch_is_cropped_to_its_own_tokens():
    from quackae.data.tokenizer import EOS, train_tokenizer
    from quackae.viz.render import item_attention_image

    tokenizer = train_tokenizer(["the duck swims", "the duck swam"] * 4, vocab_size=280, show_progress=False)
    eos = tokenizer.token_to_id(EOS)
    item = tokenizer.encode("the duck swims", add_special_tokens=False).ids + [eos]  # (T_item,)
    inputs = item + [0] * 4  # padded to the batch's width
    outputs = item[:2] + [eos] + [0] * 6  # decoded, then padding after [EOS]
    weights = _weights(len(outputs), len(inputs))  # (S, T) of the batch
    image = item_attention_image(tokenizer, weights, inputs, outputs, pad_id=0, eos_id=eos)
    assert image.info["cells"] == f"3x{len(item)}"
    reference = attention_image(
        weights[:3, : len(item)], token_labels(tokenizer, item), token_labels(tokenizer, outputs[:3])
    )
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_attention_without_labels_draws_the_whole_matrix():
    assert attention_image(_weights(3, 7)).info["cells"] == "3x7"
    with pytest.raises(ValueError, match="labels for attention weights of shape"):
        attention_image(_weights(3, 2), ["a", "b", "c"], ["x"])


def test_confusion_has_one_cell_per_class_pair():
    classes = ["argparse", "asyncio", "collections"]
    confusion = [[5, 1, 0], [2, 7, 1], [0, 0, 4]]
    image = _saved(confusion_image(confusion, classes, cell=30))
    assert image.text["cells"] == "3x3"
    four = confusion_image([[1, 0, 0, 0]] * 4, [*classes, "email"], cell=30)
    assert four.width - image.width == 30 and four.height - image.height == 30
    with pytest.raises(ValueError, match="need 3 row labels and 3 column labels"):
        heatmap_image(np.zeros((3, 3)), ["a"], ["b"], "true class", "predicted class")


def test_token_labels_are_readable():
    from quackae.data.tokenizer import EOS, train_tokenizer

    tokenizer = train_tokenizer(["the duck swims", "the duck swam"] * 4, vocab_size=280, show_progress=False)
    ids = tokenizer.encode("the duck", add_special_tokens=False).ids + [tokenizer.token_to_id(EOS)]
    labels = token_labels(tokenizer, ids)
    assert labels[-1] == "[EOS]"
    assert "".join(labels[:-1]).replace("_", " ") == "the duck"


METRICS = """epoch,lr-AdamW,step,train_loss_epoch,train_loss_step,train_token_acc_step,val_loss,val_token_acc
,0.003,9,,,,,
0,,9,,31.5,0.14,,
0,,9,,,,85.0,0.06
0,,9,75.0,,,,
1,,19,,27.5,0.16,,
1,,19,,,,76.1,0.07
2,,29,,26.7,0.18,,
2,,29,,,,74.5,0.08
"""


def test_curves_are_written_from_metrics(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS)
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert metrics["val_loss"] == [(9.0, 85.0), (19.0, 76.1), (29.0, 74.5)]
    assert [s for s, _ in metrics["train_loss_step"]] == [9.0, 19.0, 29.0]
    path = write_curves(tmp_path)
    assert path == tmp_path / "curves.png" and not list(tmp_path.glob(".*.tmp"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == WIDTH
        assert image.text["points"] == "train_loss_step=3,val_loss=3,train_token_acc_step=3,val_token_acc=3"


def test_plot_command_and_its_one_line_error(tmp_path, capsys):
    from quackae.cli.command import main

    (tmp_path / "metrics.csv").write_text(METRICS)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert f"files written:\n  {tmp_path / 'c.png'}" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"quackae plot: error: {tmp_path / 'missing'} has no metrics.csv; pass a RUN directory written by quackae train"
    ]
    with pytest.raises(QuackError):
        write_curves(tmp_path / "missing")
