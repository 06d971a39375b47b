"""Figures: the VOC palette, overlays, class score maps (paper Fig. 1 style), comparison rows
(Fig. 2 style: image | FCN-32s | FCN-16s | FCN-8s | ground truth) and training curves."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fcn_jax import preprocessing as prep_lib
from fcn_jax.data.classes import full_palette, voc_palette
from fcn_jax.models import forms as forms_lib


PALETTE = voc_palette()


def colorize(label: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
  """(H, W) class ids (255 void) -> (H, W, 3) uint8 in `palette` (the classes' colours; default
  the VOC palette)."""
  return full_palette(palette)[np.asarray(label, np.uint8)]


def label_png(label: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
  """A palette PNG as VOC's SegmentationClass: pixel value = class id, shown in `palette`."""
  img = Image.fromarray(np.asarray(label, np.uint8), mode='P')
  img.putpalette(full_palette(palette).reshape(-1).tolist())
  return img


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5,
            palette: np.ndarray | None = None) -> np.ndarray:
  """Blends the coloured label map over an RGB image; background and void stay untinted."""
  color = colorize(label, palette).astype(np.float32)
  img = np.asarray(image, np.float32)
  tint = ((label > 0) & (label != 255))[..., None]
  return np.where(tint, (1 - alpha) * img + alpha * color, img).astype(np.uint8)


def legend_strip(label: np.ndarray, class_names: Sequence[str], palette=None,
                 width: int | None = None, min_fraction: float = 0.0) -> np.ndarray:
  """(h, width, 3) uint8 strip naming the classes present in `label` beside their colours."""
  from PIL import ImageDraw
  label = np.asarray(label)
  colors = full_palette(palette)
  present = [int(c) for c in np.unique(label) if c < len(class_names) and
             (label == c).mean() > min_fraction]
  width = width or label.shape[1]
  entries = [(c, f'{class_names[c]} {100 * (label == c).mean():.0f}%') for c in present]
  row_h, x, rows = 14, 4, [[]]
  for c, text in entries:  # wrap entries into rows that fit the width
    w = 16 + 6 * len(text) + 10
    if x + w > width and rows[-1]:
      rows.append([])
      x = 4
    rows[-1].append((x, c, text))
    x += w
  strip = Image.new('RGB', (width, row_h * len(rows) + 4), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for r, row in enumerate(rows):
    y = 2 + r * row_h
    for x, c, text in row:
      draw.rectangle([x, y + 1, x + 11, y + 11], fill=tuple(int(v) for v in colors[c]),
                     outline=(0, 0, 0))
      draw.text((x + 15, y), text, fill=(0, 0, 0))
  return np.asarray(strip)


def overlay_with_legend(image: np.ndarray, label: np.ndarray, class_names: Sequence[str],
                        palette=None) -> np.ndarray:
  """`overlay` with the legend of the classes present below it."""
  top = overlay(image, label, palette=palette)
  legend = legend_strip(label, class_names, palette, width=top.shape[1])
  return np.concatenate([top, legend], axis=0)


def _legend(ax, labels: Sequence[np.ndarray], class_names: Sequence[str], palette=None) -> None:
  """A matplotlib legend of the classes present in any of `labels`."""
  from matplotlib.patches import Patch
  colors = full_palette(palette) / 255.0
  present = sorted({int(c) for lab in labels for c in np.unique(lab) if c < len(class_names)})
  if present:
    ax.legend(handles=[Patch(color=colors[c], label=class_names[c]) for c in present],
              loc='upper left', bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  _plt().close(fig)
  return path


def training_curves(records: Sequence[dict], path: str | pathlib.Path,
                    title: str = '') -> pathlib.Path:
  """Training loss and evaluation scores against steps, from metrics.jsonl records."""
  plt = _plt()
  train = [r for r in records if r.get('kind') == 'train' and r.get('loss') is not None]
  evals = [r for r in records if r.get('kind') == 'eval']
  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.6))
  if train:
    ax_loss.plot([r['step'] for r in train], [r['loss'] for r in train], lw=1)
  ax_loss.set(xlabel='step', ylabel='training loss', title=f'{title} loss'.strip())
  ax_loss.grid(alpha=0.3)
  for key, name in (('pixel_acc', 'pixel acc.'), ('mean_acc', 'mean acc.'), ('mean_iu', 'mean IU'),
                    ('fw_iu', 'f.w. IU')):
    pts = [(r['step'], r[key]) for r in evals if r.get(key) is not None]
    if pts:
      ax_eval.plot(*zip(*pts), marker='o', ms=3, label=name)
  ax_eval.set(xlabel='step', ylabel='score', ylim=(0, 1), title=f'{title} evaluation'.strip())
  ax_eval.grid(alpha=0.3)
  if evals:
    ax_eval.legend(fontsize=8)
  return _save(fig, path)


def predict_scores(model, variables: dict, image: np.ndarray, preprocessing: str) -> np.ndarray:
  """uint8 RGB (H, W, 3) -> float32 class scores (H, W, C) at the input size (the first head's,
  for nets with several heads or an auxiliary head)."""
  x = prep_lib.get(preprocessing)(image)[None]
  out = forms_lib.jit(lambda v, x: model.apply(v, x, train=False),
                      forms=getattr(model, 'forms', None))(variables, x)
  if isinstance(out, dict):
    out = out[model.head_names[0]]
  return np.asarray(out)[0]


def score_map_figure(model, variables: dict, examples: Sequence[tuple[str, np.ndarray, np.ndarray]],
                     class_names: Sequence[str], path: str | pathlib.Path, preprocessing: str,
                     classes_per_image: int = 2, palette=None) -> pathlib.Path:
  """Paper Fig. 1 style: each image, its prediction and ground truth, beside the score maps of the
  classes it contains."""
  plt = _plt()
  rows = len(examples)
  cols = 3 + classes_per_image
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
  for row, (name, image, label) in zip(axes, examples):
    scores = predict_scores(model, variables, image, preprocessing)
    present = [c for c in np.unique(label) if 0 < c < len(class_names)]
    present = sorted(present, key=lambda c: -(label == c).sum())[:classes_per_image]
    row[0].imshow(image)
    row[0].set_title(name, fontsize=8)
    prediction = np.argmax(scores, -1)
    row[1].imshow(colorize(prediction, palette))
    row[1].set_title('prediction', fontsize=8)
    row[2].imshow(colorize(label, palette))
    row[2].set_title('ground truth', fontsize=8)
    _legend(row[-1], [prediction, label], class_names, palette)
    for ax, c in zip(row[3:], present):
      ax.imshow(scores[..., c], cmap='jet')
      ax.set_title(f'score: {class_names[c]}', fontsize=8)
    for ax in row:
      ax.axis('off')
  return _save(fig, path)


def comparison_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                    path: str | pathlib.Path, class_names: Sequence[str] | None = None,
                    palette=None) -> pathlib.Path:
  """Paper Fig. 2 style: one row per image, one column per entry of `columns`.

  Each row maps a column name to either an RGB image or an (H, W) label map (coloured in the VOC
  palette), e.g. columns = ('image', 'FCN-32s', 'FCN-16s', 'FCN-8s', 'ground truth').
  """
  plt = _plt()
  fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.4 * len(rows)),
                           squeeze=False)
  for r, (ax_row, row) in enumerate(zip(axes, rows)):
    for ax, col in zip(ax_row, columns):
      value = np.asarray(row[col])
      ax.imshow(value if value.ndim == 3 else colorize(value, palette))
      if r == 0:
        ax.set_title(col, fontsize=9)
      ax.axis('off')
    if class_names is not None:
      _legend(ax_row[-1], [np.asarray(row[c]) for c in columns if np.asarray(row[c]).ndim == 2],
              class_names, palette)
  return _save(fig, path)


# Error map colours: right, wrong, ignored (void or padding: never counted).
ERROR_COLORS = {'correct': (0, 0, 0), 'wrong': (230, 30, 30), 'ignored': (150, 150, 150)}


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], path: str | pathlib.Path,
                     title: str = '') -> pathlib.Path:
  """The confusion matrix normalised by rows (each ground-truth class sums to 1), class names on
  both axes: which classes a class is mistaken for, whatever its pixel count. Rows of classes
  absent from the ground truth stay blank. Cells carry percentages up to 30 classes; the figure
  grows with the class count so that 60 names stay readable."""
  plt = _plt()
  hist = np.asarray(confusion, np.float64)
  n = hist.shape[0]
  rows = hist.sum(axis=1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    normalised = np.where(rows > 0, hist / np.maximum(rows, 1), np.nan)
  side = float(np.clip(0.28 * n + 2.5, 5.0, 24.0))
  font = 8 if n <= 30 else 7
  fig, ax = plt.subplots(figsize=(side + 1.2, side))
  cmap = plt.get_cmap('Blues').with_extremes(bad='white')
  image = ax.imshow(normalised, cmap=cmap, vmin=0.0, vmax=1.0, interpolation='nearest')
  names = [str(c) for c in class_names][:n] + [str(i) for i in range(len(class_names), n)]
  ax.set_xticks(range(n), names, rotation=90, fontsize=font)
  ax.set_yticks(range(n), names, fontsize=font)
  ax.set_xlabel('prediction')
  ax.set_ylabel('ground truth')
  ax.set_title(title or 'confusion matrix (rows normalised)', fontsize=10)
  if n <= 30:
    for i, j in zip(*np.nonzero(np.nan_to_num(normalised) >= 0.005)):
      value = normalised[i, j]
      ax.text(j, i, f'{100 * value:.0f}', ha='center', va='center', fontsize=font - 1,
              color='white' if value > 0.5 else 'black')
  fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
  return _save(fig, path)


def error_map(label: np.ndarray, prediction: np.ndarray, num_classes: int,
              ignore_label: int = 255) -> np.ndarray:
  """(H, W, 3) uint8: right pixels black, wrong ones red, ignored ones grey (void, padding and any
  label outside the classes: the pixels the scores never count, with the metrics' rule)."""
  label, prediction = np.asarray(label), np.asarray(prediction)
  ignored = (label < 0) | (label >= num_classes) | (label == ignore_label)
  out = np.empty(label.shape + (3,), np.uint8)
  out[...] = ERROR_COLORS['correct']
  out[(prediction != label) & ~ignored] = ERROR_COLORS['wrong']
  out[ignored] = ERROR_COLORS['ignored']
  return out


def worst_gallery(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, num_classes: int,
                  class_names: Sequence[str] | None = None, palette=None,
                  ignore_label: int = 255) -> pathlib.Path:
  """One row per image, worst first: image | ground truth | prediction | errors, titled with its
  name and mean IU. Each row: 'label', 'prediction' ((H, W) class ids), 'image' (RGB, or None),
  'file_name', 'mean_iu' and 'pixel_acc'."""
  plt = _plt()
  columns = ('image', 'ground truth', 'prediction', 'errors: red wrong, grey ignored')
  fig, axes = plt.subplots(max(len(rows), 1), len(columns),
                           figsize=(2.6 * len(columns) + 1.6, 2.4 * max(len(rows), 1)),
                           squeeze=False)
  for r, (ax_row, row) in enumerate(zip(axes, rows)):
    label, prediction = np.asarray(row['label']), np.asarray(row['prediction'])
    shown = np.where((label >= 0) & (label < num_classes), label, 255)
    panels = [row.get('image'), colorize(shown, palette), colorize(prediction, palette),
              error_map(label, prediction, num_classes, ignore_label)]
    for ax, panel, col in zip(ax_row, panels, columns):
      if panel is not None:
        ax.imshow(panel)
      if r == 0:
        ax.set_title(col, fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
    ax_row[0].set_ylabel(f'{row.get("file_name") or row.get("index", r)}\nmean IU '
                         f'{100 * row["mean_iu"]:.1f}, acc. {100 * row["pixel_acc"]:.1f}',
                         fontsize=8)
    if class_names is not None:
      _legend(ax_row[-1], [label, prediction], class_names, palette)
  for ax in axes[len(rows):].flat:
    ax.axis('off')
  return _save(fig, path)
