"""The ``relprop`` command: ``explain``, ``compare`` and ``evaluate`` from the shell.

::

    relprop explain  --method lrp.epsilon --input default --out heatmaps/
    relprop compare  --methods gradient,lrp.epsilon,deep_taylor --input default --out grid.png
    relprop evaluate --methods gradient,lrp.epsilon --fill zeros --out evaluation/

Everything works offline on the embedded MNIST model (``--model default``). Outputs appear complete
or not at all: they are written into a temporary file or directory beside the target and renamed.
User mistakes (missing files, unreadable images, unknown methods, inputs the model cannot take,
unwritable outputs) end with exit status 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = ["main"]

COMPARE_METHODS = (
    "gradient",
    "input_t_gradient",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
    "lrp.epsilon",
    "lrp.epsilon_plus_flat",
    "lrp.epsilon_gamma_box",
    "deep_taylor",
    "random",
)
# Analyzers whose first layer uses the z^B rule: they need the input's value range.
_BOUNDED_METHODS = ("lrp.bounded", "lrp.epsilon_gamma_box", "deep_taylor.bounded")
_SEEDED_METHODS = ("random", "smoothgrad")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# What reading a tensor file or a state_dict, or calling a model on the wrong shape, raises.
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError)
_FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class CliError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


@dataclass
class LoadedModel:
    """A model with what the CLI must know to feed and explain it."""

    model: nn.Module
    description: str
    # (C, H, W) the model takes, when known; image files are converted and resized to it.
    input_shape: tuple[int, int, int] | None = None
    # Value range of valid inputs (the z^B rule's bounds); None: taken from the inputs.
    low: float | None = None
    high: float | None = None
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    """A batch of inputs with a name per sample and the true labels, when known."""

    x: torch.Tensor
    names: list[str]
    labels: list[int | None]


# ---------------------------------------------------------------------------------------------
# Models


def load_model(spec: str) -> LoadedModel:
    """Resolve ``--model``: ``default``, a torchvision name, or ``WEIGHTS:module.path:Class``."""
    if spec == "default":
        from relprop import models

        info = models.default_model_info()
        return LoadedModel(
            models.load_default_model(),
            f"default ({info['architecture']}, held-out accuracy {info['heldout_accuracy']})",
            tuple(info["input_shape"]),
            float(info["input_low"]),
            float(info["input_high"]),
        )
    if spec.count(":") >= 2:
        return _load_custom_model(spec)
    import torchvision

    if spec in torchvision.models.list_models():
        return _load_torchvision_model(spec)
    raise CliError(
        f"unknown model {spec!r}: use 'default', a torchvision model name (e.g. resnet18) or "
        "WEIGHTS.pt:module.path:ClassName"
    )


def _load_torchvision_model(name: str) -> LoadedModel:
    import torchvision

    # weights=None: nothing is downloaded; the architecture gets random weights.
    model = torchvision.models.get_model(name, weights=None).eval()
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return LoadedModel(
        model,
        f"torchvision {name} (random weights)",
        (3, 224, 224),
        float(((0 - mean) / std).min()),
        float(((1 - mean) / std).max()),
        normalize=lambda x: (x - mean) / std,
        notes=[f"torchvision {name} has random weights: its explanations show no learned evidence"],
    )


def _load_custom_model(spec: str) -> LoadedModel:
    weights, module_name, class_name = spec.rsplit(":", 2)
    path = Path(weights)
    if not path.is_file():
        raise CliError(f"model weights file not found: {weights}")
    try:
        with _working_directory_importable():
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise CliError(f"cannot import module {module_name!r} for --model: {error}") from None
    model_class = getattr(module, class_name, None)
    if model_class is None:
        raise CliError(f"module {module_name!r} has no {class_name!r}")
    try:
        model = model_class()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model.load_state_dict(state)
    except _LOAD_ERRORS as error:
        raise CliError(
            f"cannot load {weights} into {module_name}.{class_name}: {_first_line(error)}"
        ) from None
    return LoadedModel(model.eval(), f"{module_name}.{class_name} from {weights}")


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    """Let ``--model``'s module be found in the working directory, as under ``python -m relprop``
    (whose ``sys.path`` starts with it); the ``relprop`` console script's starts with its own
    ``bin`` directory instead."""
    cwd = os.getcwd()
    if "" in sys.path or cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


# ---------------------------------------------------------------------------------------------
# Inputs


def load_inputs(sources: Sequence[str], loaded: LoadedModel, limit: int | None = None) -> Inputs:
    """Read ``--input``: ``default`` or image files, ``.pt`` and ``.npy`` tensors."""
    if list(sources) == ["default"]:
        inputs = _default_inputs(loaded)
    else:
        xs, names, labels = [], [], []
        for source in sources:
            batch = _read_input_file(source, loaded)
            stem = Path(source).stem
            names += [stem] if len(batch) == 1 else [f"{stem}_{i:03d}" for i in range(len(batch))]
            labels += [None] * len(batch)
            xs.append(batch)
        shapes = {tuple(x.shape[1:]) for x in xs}
        if len(shapes) > 1:
            raise CliError(f"inputs have different shapes {sorted(shapes)}; give one shape per run")
        inputs = Inputs(torch.cat(xs), _unique(names), labels)
    if limit is not None:
        inputs = Inputs(inputs.x[:limit], inputs.names[:limit], inputs.labels[:limit])
    if len(inputs.x) == 0:
        raise CliError("no inputs")
    _check_model_takes(loaded, inputs.x)
    if loaded.low is None:
        loaded.low, loaded.high = float(inputs.x.min()), float(inputs.x.max())
    return inputs


def _default_inputs(loaded: LoadedModel, evaluation_size: int | None = None) -> Inputs:
    from relprop import models

    if loaded.input_shape not in (None, (1, 28, 28)):
        raise CliError(
            "--input default holds 1×28×28 MNIST digits for --model default; pass image or "
            "tensor files"
        )
    if evaluation_size is None:
        x, labels = models.default_inputs()
        names = [f"digit{i:02d}_label{int(c)}" for i, c in enumerate(labels)]
    else:
        x, labels = models.heldout_data()
        # Evenly spaced over the class-sorted held-out set: every class equally represented.
        picks = torch.linspace(0, len(x) - 1, evaluation_size).round().long().unique()
        x, labels = x[picks], labels[picks]
        names = [f"heldout{int(i):04d}_label{int(labels[k])}" for k, i in enumerate(picks)]
    return Inputs(x, names, [int(c) for c in labels])


def _read_input_file(source: str, loaded: LoadedModel) -> torch.Tensor:
    path = Path(source)
    if not path.is_file():
        raise CliError(f"input file not found: {source}")
    suffix = path.suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return _read_image(path, loaded)
    try:
        if suffix == ".npy":
            array = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".pt":
            array = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CliError(
                f"unsupported input file {source}: expected an image ({', '.join(_IMAGE_SUFFIXES)}), "
                ".pt or .npy"
            )
    except CliError:
        raise
    except _LOAD_ERRORS as error:
        raise CliError(f"cannot read {source}: {_first_line(error)}") from None
    if not isinstance(array, torch.Tensor):
        raise CliError(f"{source} holds a {type(array).__name__}, not a tensor")
    x = array.to(torch.float32)
    shape = loaded.input_shape
    if shape is not None and tuple(x.shape) == shape[1:]:
        x = x.unsqueeze(0)  # a single-channel (H, W) array
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise CliError(
            f"input {source} has shape {tuple(array.shape)}; expected (C, H, W) or (N, C, H, W)"
        )
    return x


def _read_image(path: Path, loaded: LoadedModel) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            channels = _image_channels(loaded)
            picture = opened.convert("L" if channels == 1 else "RGB")
            if loaded.input_shape is not None:
                picture = _fit(picture, loaded.input_shape[1:])
            pixels = np.asarray(picture, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise CliError(f"cannot read image {path}: {_first_line(error)}") from None
    x = torch.from_numpy(pixels.copy())
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    x = x.unsqueeze(0)
    return loaded.normalize(x) if loaded.normalize is not None else x


def _image_channels(loaded: LoadedModel) -> int:
    """Channels to convert images to: the model's, else its first convolution's, else RGB."""
    if loaded.input_shape is not None:
        return loaded.input_shape[0]
    first_conv = next((m for m in loaded.model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def _fit(picture, size: tuple[int, int]):
    """Resize the shorter side to the model's and crop the centre (torchvision's preprocessing)."""
    from PIL import Image

    height, width = size
    scale = max(height / picture.height, width / picture.width)
    resized = picture.resize(
        (max(width, round(picture.width * scale)), max(height, round(picture.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _check_model_takes(loaded: LoadedModel, x: torch.Tensor) -> None:
    expected = loaded.input_shape
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise CliError(f"inputs have shape {tuple(x.shape[1:])} but the model takes {expected}")
    try:
        with torch.no_grad():
            output = loaded.model(x[:1])
    except _FORWARD_ERRORS as error:
        raise CliError(
            f"the model cannot take inputs of shape {tuple(x.shape[1:])}: {_first_line(error)}"
        ) from None
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise CliError("the model must return a (N, classes) tensor of scores")


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


# ---------------------------------------------------------------------------------------------
# Analyzers


def check_methods(methods: Sequence[str]) -> list[str]:
    """Return the method names, or raise with the list of valid ones."""
    import relprop

    valid = relprop.analyzer_names()
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise CliError(f"unknown method {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    if not methods:
        raise CliError("no method given")
    if "lrp" in methods:
        # The generic name needs a composite= or rule= object, which a command line cannot give.
        raise CliError(
            "method 'lrp' needs a composite or rule object and is for the Python API; on the "
            "command line pick a preset, e.g. lrp.epsilon_plus_flat or lrp.epsilon"
        )
    return list(methods)


def make_analyzer(method: str, loaded: LoadedModel, seed: int):
    """Create an analyzer that explains the neurons given per sample (``neuron_selection_mode="index"``).

    Bounded methods get the model's input range; noisy ones the seed; SmoothGrad's noise is 10% of
    the input range (the scale iNNvestigate's examples use) instead of the unit default.
    """
    import relprop

    options: dict[str, Any] = {}
    span = loaded.high - loaded.low
    if method in _BOUNDED_METHODS:
        options.update(low=loaded.low, high=loaded.high)
    if method in _SEEDED_METHODS:
        options["seed"] = seed
    if method == "smoothgrad":
        options["noise_scale"] = 0.1 * span
    analyzer = relprop.create_analyzer(
        method, loaded.model, neuron_selection_mode="index", **options
    )
    return analyzer, options


def _targets(
    loaded: LoadedModel, x: torch.Tensor, neuron: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, target index per sample): ``neuron`` for all, else the predicted class."""
    with torch.no_grad():
        logits = loaded.model(x)
    if neuron is not None and not 0 <= neuron < logits.shape[1]:
        raise CliError(
            f"--neuron {neuron} is out of range: the model has {logits.shape[1]} outputs"
        )
    if neuron is None:
        return logits, logits.argmax(1)
    return logits, torch.full((len(x),), neuron, dtype=torch.long)


def _analyze_batches(analyzer, x: torch.Tensor, targets: torch.Tensor, batch_size: int, label: str):
    """Relevance of ``x`` in batches, and the seconds spent per sample (the batch's time shared)."""
    from tqdm import tqdm

    relevance, seconds = [], []
    starts = range(0, len(x), batch_size)
    for begin in tqdm(starts, desc=label, unit="batch", leave=False, disable=None):
        batch = slice(begin, begin + batch_size)
        start = time.perf_counter()
        relevance.append(analyzer.analyze(x[batch], neuron_selection=targets[batch]).detach())
        elapsed = time.perf_counter() - start
        seconds += [elapsed / len(x[batch])] * len(x[batch])
    return torch.cat(relevance), seconds


# ---------------------------------------------------------------------------------------------
# Atomic outputs


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield an empty staging directory whose files land in ``out`` only if the block succeeds.

    A new ``out`` is created by renaming the staging directory (atomic); into an existing one each
    file is moved by ``os.replace`` (atomic per file), the summary files last.
    """
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise CliError(f"output {out} exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(
            tempfile.mkdtemp(prefix=f".{out.name}.", dir=out if out.exists() else out.parent)
        )
    except OSError as error:
        raise CliError(
            f"cannot write to output directory {out}: {error.strerror or error}"
        ) from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield stage
        if out.exists():
            summaries = [p for p in stage.iterdir() if p.name.startswith("summary")]
            for path in [p for p in stage.iterdir() if p not in summaries] + summaries:
                os.replace(path, out / path.name)
            stage.rmdir()
        else:
            # mkdtemp makes a private directory; the result gets the usual permissions.
            os.chmod(stage, 0o777 & ~umask)
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _check_writable_file(out: Path) -> None:
    """Fail before any work if ``out`` cannot be created (its directory is made if missing)."""
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; give a file name such as grid.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as error:
        raise CliError(f"cannot write {out}: {error.strerror or error}") from None


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Commands


def _auto_scale(x: torch.Tensor) -> int:
    """Nearest-neighbour upscaling so small inputs (28×28 digits) become readable (≥ 224 px)."""
    return max(1, 224 // max(x.shape[-2:]))


def cmd_explain(args: argparse.Namespace) -> int:
    """``relprop explain``: one heatmap PNG per input and a JSON + CSV summary."""
    from relprop import visualize

    (method,) = check_methods([args.method])
    loaded = load_model(args.model)
    inputs = load_inputs(args.input, loaded, args.limit)
    logits, targets = _targets(loaded, inputs.x, args.neuron)
    scale = args.scale or _auto_scale(inputs.x)
    with staged_directory(args.out) as stage:
        analyzer, options = make_analyzer(method, loaded, args.seed)
        relevance, seconds = _analyze_batches(analyzer, inputs.x, targets, args.batch_size, method)
        maps = visualize.heatmap(relevance, clip=args.clip)
        rows = []
        for i, name in enumerate(inputs.names):
            filename = f"{name}_{method}.png"
            visualize.save_png(maps[i], stage / filename, scale=scale)
            rows.append(
                {
                    "input": name,
                    "label": inputs.labels[i],
                    "prediction": int(logits[i].argmax()),
                    "target": int(targets[i]),
                    "logit": float(logits[i, targets[i]]),
                    "relevance_sum": float(relevance[i].double().sum()),
                    "seconds": seconds[i],
                    "heatmap": filename,
                }
            )
        summary = {
            "command": "explain",
            "model": loaded.description,
            "method": method,
            "options": options,
            "notes": loaded.notes,
            "results": rows,
        }
        _write_text(stage / "summary.csv", _csv_text(rows))
        _write_text(stage / "summary.json", json.dumps(summary, indent=2) + "\n")
    for note in loaded.notes:
        print(f"relprop: note: {note}", file=sys.stderr)
    print(f"wrote {len(rows)} heatmaps and summary.json/summary.csv to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``relprop compare``: a montage of inputs (rows) × methods (columns)."""
    from relprop import visualize

    methods = check_methods(_split(args.methods))
    loaded = load_model(args.model)
    inputs = load_inputs(args.input, loaded, args.limit)
    logits, targets = _targets(loaded, inputs.x, args.neuron)
    out = Path(args.out)
    _check_writable_file(out)
    tiles = [[visualize.image(x, loaded.low, loaded.high)] for x in inputs.x]
    for method in methods:
        analyzer, _ = make_analyzer(method, loaded, args.seed)
        relevance, _ = _analyze_batches(analyzer, inputs.x, targets, args.batch_size, method)
        for row, heat in zip(tiles, visualize.heatmap(relevance, clip=args.clip)):
            row.append(heat)
    row_labels = [
        _row_label(inputs.names[i], inputs.labels[i], int(logits[i].argmax()), int(targets[i]))
        for i in range(len(inputs.x))
    ]
    scale = args.scale or max(1, _auto_scale(inputs.x) // 2)
    grid = visualize.montage(tiles, row_labels, ["input", *methods], scale=scale)
    visualize.save_png(grid, out)
    print(f"wrote {out} ({len(inputs.x)} inputs × {len(methods)} methods)")
    return 0


def _row_label(name: str, label: int | None, prediction: int, target: int) -> str:
    if label is not None:
        return f"label {label}\npred {prediction}"
    return f"{name}\npred {prediction}" + ("" if target == prediction else f"\ntarget {target}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``relprop evaluate``: region perturbation (MoRF, LeRF) with AOPC and ABPC per method."""
    from tqdm import tqdm

    from relprop import evaluate

    methods = check_methods(_split(args.methods))
    if "random" not in methods:
        methods.append("random")
    loaded = load_model(args.model)
    if list(args.input) == ["default"]:
        inputs = _default_inputs(loaded, args.num_samples)
        _check_model_takes(loaded, inputs.x)
    else:
        inputs = load_inputs(args.input, loaded, args.num_samples)
    _, targets = _targets(loaded, inputs.x, args.neuron)
    patch = args.patch or max(1, round(max(inputs.x.shape[-2:]) / 7))
    with staged_directory(args.out) as stage:
        results, curves = [], {}
        for method in tqdm(methods, desc="methods", unit="method", disable=None):
            analyzer, _ = make_analyzer(method, loaded, args.seed)
            relevance, _ = _analyze_batches(analyzer, inputs.x, targets, args.batch_size, method)
            for order in evaluate.ORDERS:
                curves[method, order] = evaluate.region_perturbation(
                    loaded.model,
                    inputs.x,
                    relevance,
                    targets,
                    patch=patch,
                    fill=args.fill,
                    order=order,
                    steps=args.steps,
                    seed=args.seed,
                    batch_size=args.batch_size * 32,
                    low=loaded.low,
                    high=loaded.high,
                )
            morf, lerf = curves[method, "morf"], curves[method, "lerf"]
            per_sample = evaluate.abpc(morf, lerf)
            results.append(
                {
                    "method": method,
                    "aopc_morf": float(evaluate.aopc(morf).mean()),
                    "aopc_lerf": float(evaluate.aopc(lerf).mean()),
                    "abpc": float(per_sample.mean()),
                    "abpc_sem": float(per_sample.std() / math.sqrt(len(per_sample)))
                    if len(per_sample) > 1
                    else 0.0,
                }
            )
        settings = {
            "model": loaded.description,
            "samples": len(inputs.x),
            "patch": patch,
            "steps": int(curves[methods[0], "morf"].shape[1] - 1),
            "fill": args.fill,
            "seed": args.seed,
            "target": "predicted class" if args.neuron is None else args.neuron,
        }
        _plot_curves(curves, methods, settings, stage / "curves.png")
        curve_rows = [
            {"method": m, "order": o, "step": k, "mean_score": float(v)}
            for (m, o), c in curves.items()
            for k, v in enumerate(c.mean(0))
        ]
        _write_text(stage / "curves.csv", _csv_text(curve_rows))
        _write_text(stage / "summary.csv", _csv_text(results))
        _write_text(stage / "summary.md", _markdown_table(results, settings))
        summary = {"command": "evaluate", "settings": settings, "results": results}
        _write_text(stage / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(_markdown_table(results, settings))
    return 0


def _markdown_table(results: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = [
        (
            f"Region perturbation on {settings['model']}: {settings['samples']} inputs, "
            f"{settings['patch']}×{settings['patch']} patches, {settings['steps']} steps, "
            f"fill {settings['fill']}, target: {settings['target']}, seed {settings['seed']}."
        ),
        "",
        "| method | AOPC MoRF ↑ | AOPC LeRF ↓ | ABPC ↑ (± s.e.m.) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in sorted(results, key=lambda r: -r["abpc"]):
        lines.append(
            f"| {row['method']} | {row['aopc_morf']:.3f} | {row['aopc_lerf']:.3f} | "
            f"{row['abpc']:.3f} ± {row['abpc_sem']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _plot_curves(curves, methods: list[str], settings: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from relprop.evaluate import ORDERS

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    titles = {
        "morf": "MoRF: most relevant first (lower is better)",
        "lerf": "LeRF: least relevant first (higher is better)",
    }
    for axis, order in zip(axes, ORDERS):
        for k, method in enumerate(methods):
            mean = curves[method, order].mean(0).numpy()
            style = "--" if method == "random" else "-"
            axis.plot(np.arange(len(mean)), mean, style, color=colours(k % colours.N), label=method)
        axis.set_title(titles[order])
        axis.set_xlabel(
            f"patches perturbed ({settings['patch']}×{settings['patch']}, fill {settings['fill']})"
        )
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean score of the explained class")
    axes[1].legend(fontsize=8, loc="best")
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Entry point


def _split(methods: str) -> list[str]:
    return [m.strip() for m in methods.split(",") if m.strip()]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _quantile(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a quantile in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``relprop``."""
    parser = argparse.ArgumentParser(
        prog="relprop", description="Explain PyTorch models with LRP, Deep Taylor and gradients."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--model",
            default="default",
            help="'default' (embedded MNIST CNN), a torchvision name (random weights) or "
            "WEIGHTS.pt:module.path:ClassName",
        )
        sub.add_argument(
            "--input",
            nargs="+",
            default=["default"],
            help="'default' (shipped held-out digits) or image files / .pt / .npy tensors",
        )
        sub.add_argument(
            "--neuron", type=int, default=None, help="output index to explain (default: predicted)"
        )
        sub.add_argument("--batch-size", type=_positive_int, default=32)
        sub.add_argument("--seed", type=int, default=0, help="seed of random fills and noise")

    explain = commands.add_parser("explain", help="one heatmap PNG per input + summary")
    common(explain)
    explain.add_argument("--method", required=True, help="an analyzer name, e.g. lrp.epsilon")
    explain.add_argument("--out", required=True, type=Path, help="output directory")
    explain.add_argument(
        "--limit", type=_positive_int, default=None, help="use only the first N inputs"
    )
    explain.add_argument(
        "--scale", type=_positive_int, default=None, help="integer upscaling of heatmaps"
    )
    explain.add_argument("--clip", type=_quantile, default=None, help="clip |R| at this quantile")
    explain.set_defaults(run=cmd_explain)

    compare = commands.add_parser("compare", help="montage of inputs × methods")
    common(compare)
    compare.add_argument("--methods", default=",".join(COMPARE_METHODS), help="comma-separated")
    compare.add_argument("--out", required=True, type=Path, help="output PNG file")
    compare.add_argument(
        "--limit", type=_positive_int, default=None, help="use only the first N inputs"
    )
    compare.add_argument(
        "--scale", type=_positive_int, default=None, help="integer upscaling of tiles"
    )
    compare.add_argument("--clip", type=_quantile, default=None, help="clip |R| at this quantile")
    compare.set_defaults(run=cmd_compare)

    evaluate = commands.add_parser("evaluate", help="region perturbation: AOPC and ABPC")
    common(evaluate)
    evaluate.add_argument("--methods", default=",".join(COMPARE_METHODS), help="comma-separated")
    evaluate.add_argument("--out", required=True, type=Path, help="output directory")
    evaluate.add_argument(
        "--num-samples",
        type=_positive_int,
        default=200,
        help="inputs to evaluate (default input: that many held-out digits, all classes)",
    )
    evaluate.add_argument(
        "--patch", type=_positive_int, default=None, help="patch side (default: side/7)"
    )
    evaluate.add_argument(
        "--steps", type=_positive_int, default=None, help="patches to perturb (default all)"
    )
    evaluate.add_argument("--fill", choices=("zeros", "mean", "uniform", "blur"), default="zeros")
    evaluate.set_defaults(run=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``relprop`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except CliError as error:
        print(f"relprop: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        import relprop

        if isinstance(error, relprop.RelpropError):
            print(f"relprop: error: {_first_line(error)}", file=sys.stderr)
            return 2
        raise
