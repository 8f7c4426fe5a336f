"""The ``fitprune-fx`` command line: ``fit`` a recipe, ``inspect`` one, run the ``demo``, ``eval``.

fitprune-fx fit --model PATH --data questions.jsonl --images DIR --budget 0.6 -o recipe.json
fitprune-fx inspect recipe.json [--plot tokens.png] [--visual-tokens N]
fitprune-fx inspect recipe.json --config MODEL_DIR --image-size 672x336 [--image-size ...]
fitprune-fx inspect recipe.json --model PATH --image IMG --question Q --plot kept.png
fitprune-fx eval --model PATH --recipe recipe.json --tasks gqa,pope [--limit N] [--scorers FILE.py]

"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fitprune_fx.errors import NotPruned

PLOT_HINT = "pip install fitprune-fx[plot]"


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def check_output_path(flag: str, path: str) -> None:
    """Refuse an output path that cannot be written, before any long work starts."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CLIError(f"{flag} {path}: is a folder; give a file name")
    if not parent.is_dir():
        raise CLIError(f"{flag} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CLIError(f"{flag} {path}: not writable")


# ------------------------------------------------------------------------------------ fit
def add_fit_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit a FitPrune recipe for a FLOPs budget on a calibration set",
        description="Fit per-layer visual-token deletions that meet a reference FLOPs budget.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (save_pretrained layout) of a supported family (llava, llava-next)",
    )
    p.add_argument("--data", required=True, help="LLaVA question file (JSON lines)")
    p.add_argument("--images", required=True, help="folder the question file's images are in")
    p.add_argument("--budget", required=True, type=float, help="FLOPs reduction, e.g. 0.6")
    p.add_argument("-o", "--output", required=True, help="recipe JSON to write")
    p.add_argument("--samples", type=int, default=None, help="use the first N questions")
    p.add_argument("--batch-size", type=int, default=8, help="examples per layer call")
    p.add_argument("--tolerance", type=float, default=0.01, help="alpha search interval")
    p.add_argument(
        "--search",
        choices=["guided", "bisect"],
        default="guided",
        help="alpha search: guided (fewer exact walks, default) or plain bisection",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype (auto: as saved)",
    )
    p.add_argument("--name", default=None, help="model name recorded in the recipe")
    p.add_argument(
        "--merge-below",
        type=float,
        default=0.0,
        metavar="LAYERS",
        help="move the deletions of a pruning layer that saves less than LAYERS decoder layers' FLOPs "
        "to a neighbouring pruning layer, saving its scoring pass (benchmarks/speed.py prints what one "
        "scoring pass costs; default 0: off)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_fit)


def _load_model(path: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fitprune_fx.families import UnknownModel, family_for
    from fitprune_fx.models import register_ported_models

    if not Path(path).is_dir():
        raise CLIError(f"--model {path}: not a folder (expected a save_pretrained model folder)")
    register_ported_models()  # LLaVA-HR folders load with the Auto classes
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
        family_for(model)
        processor = AutoProcessor.from_pretrained(path)
    except UnknownModel as e:
        raise CLIError(f"--model {path}: {e}") from e
    except (OSError, ValueError, KeyError) as e:  # no config.json, unknown model type, missing files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"--model {path}: cannot load a model and processor from this folder ({first})") from e
    return model.to(device).eval(), processor


def check_question_file(data: str, images: str, limit: int | None) -> None:
    """Parse the question file and find every image it names (cheap), or raise CLIError."""
    from fitprune_fx.calibration import CalibrationError, read_question_file

    try:
        questions = read_question_file(data)[:limit]
    except (CalibrationError, OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--data {data}: {e}") from e
    if not questions:
        raise CLIError(f"--data {data}: no questions (the file is empty)")
    missing = [q["image"] for q in questions if not (Path(images) / str(q["image"])).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CLIError(
            f"--images {images}: {len(missing)} of {len(questions)} images named in {data} are not there "
            f"(e.g. {', '.join(map(repr, missing[:3]))}{more}); point --images at the folder holding them"
        )


def run_fit(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fitprune_fx.calibration import CalibrationError, has_chat_template, load_question_file
    from fitprune_fx.fit_search import BudgetOutOfReach
    from fitprune_fx.fitting import FitSession
    from fitprune_fx.recipe_merge import merge_small_deletions

    if not 0.0 < args.budget < 1.0:
        raise CLIError(f"--budget {args.budget}: give a fraction in (0, 1), e.g. 0.6 for 60%")
    for flag, path, kind in (("--data", args.data, "file"), ("--images", args.images, "dir")):
        ok = Path(path).is_file() if kind == "file" else Path(path).is_dir()
        if not ok:
            raise CLIError(f"{flag} {path}: no such {'file' if kind == 'file' else 'folder'}")
    if args.merge_below < 0:
        raise CLIError(f"--merge-below {args.merge_below}: give a number of decoder layers >= 0, e.g. 0.3")
    check_output_path("-o", args.output)
    check_question_file(args.data, args.images, args.samples)  # before the (slow) model load
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, processor = _load_model(args.model, args.device, args.dtype)
    if not has_chat_template(processor):
        print(
            'note: the processor has no chat template; prompts use "USER: <image>\\n{text} ASSISTANT:"',
            file=sys.stderr,
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chat-template note above says it once
        try:
            calibration = load_question_file(args.data, args.images, processor, limit=args.samples)
        except (CalibrationError, OSError) as e:
            raise CLIError(f"--data {args.data}: {e}") from e
    layers = model.config.text_config.num_hidden_layers
    # Steps: one per example (embedding), one per layer (statistics), one per exact walk.
    bar = tqdm(total=len(calibration) + layers, desc="fit", unit="step", disable=args.no_progress)

    def progress(n: int) -> None:
        if bar.n + n > bar.total:
            bar.total = bar.n + n
        bar.update(n)

    try:
        try:
            session = FitSession(model, calibration, batch_size=args.batch_size, progress=progress)
        except NotImplementedError as e:  # a family whose decoder the fit does not model
            raise NotPruned(f"cannot fit {args.model}: {e}") from e
        bar.set_description("fit: alpha search")
        name = args.name or Path(args.model).name
        recipe = session.recipe(args.budget, args.tolerance, name=name, strategy=args.search)
        if args.merge_below > 0:
            recipe = merge_small_deletions(recipe, args.merge_below)
    except BudgetOutOfReach as e:
        raise CLIError(f"--budget {args.budget}: {e}") from e
    finally:
        bar.close()
    recipe.to_json(args.output)
    print(recipe.describe())
    fit = recipe.fit or {}
    print(
        f"alpha {fit.get('alpha')}, {fit.get('samples')} samples, {fit.get('walks')} exact walks, "
        f"{fit.get('seconds')} s; wrote {args.output}"
    )
    check_pass_prunes(model, calibration[0], recipe)
    return 0


def check_pass_prunes(model, example: dict, recipe) -> None:
    """Run `example` once through the pass (no Inductor): `NotPruned` with the reason when the pass does
    not prune this model on the installed transformers, so a fitted recipe is not silently useless."""
    import warnings

    import torch

    from fitprune_fx.backend import fitprune_backend

    device = next(model.parameters()).device
    example = {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
    backend = fitprune_backend(recipe, compiler="eager", progress=False)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotPruned repeats the backend's warning
        torch.compile(model, backend=backend)(**example)
    backend.require_pruned()
    visual = backend.pruned_graphs[0].result.visual_tokens
    print(f"checked: the pass prunes this model on this stack ({visual} visual tokens in the check)")


# -------------------------------------------------------------------------------- inspect
def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="print a recipe's per-layer deletions, tokens left and FLOPs; optionally plot it",
        description="Show a recipe: per-layer deletions, visual tokens left and FLOPs.",
    )
    p.add_argument("recipe", help="recipe JSON file or a shipped name like llava-1.5-7b/60.json")
    p.add_argument("--plot", metavar="PNG", help="draw visual tokens kept per layer to a PNG")
    p.add_argument(
        "--visual-tokens",
        type=int,
        default=None,
        metavar="N",
        help="show counts scaled to an example with N visual tokens",
    )
    p.add_argument(
        "--image-size",
        action="append",
        default=[],
        metavar="HxW",
        help="LLaVA-NeXT: show counts for an image of HEIGHTxWIDTH pixels (repeatable; needs --config)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="model folder or config.json of a LLaVA-NeXT model (for --image-size)",
    )
    p.add_argument(
        "--text-tokens", type=int, default=0, metavar="T", help="text tokens for the full FLOPs model"
    )
    p.add_argument("--model", metavar="PATH", help="with --image: the model folder to run the recipe on")
    p.add_argument(
        "--image", metavar="IMG", help="draw this image once per pruning layer, kept patches lit (--plot)"
    )
    p.add_argument("--question", metavar="Q", help="with --image: the question asked about it")
    p.set_defaults(func=run_inspect)


def _parse_image_size(text: str) -> tuple[int, int]:
    """Parse "672x336" to (672, 336): height x width in pixels."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise CLIError(f"--image-size {text}: give HEIGHTxWIDTH in pixels, e.g. 672x336")
    return int(parts[0]), int(parts[1])


def _image_size_config(path: str | None):
    """(config, family) of a model whose visual count depends on the image size, for --image-size."""
    if path is None:
        raise CLIError("--image-size needs --config MODEL_DIR (or its config.json), e.g. of a LLaVA-NeXT")
    from transformers import AutoConfig

    from fitprune_fx.families import UnknownModel, family_for

    p = Path(path)
    if p.is_dir():
        config = AutoConfig.from_pretrained(p)
    elif p.is_file():
        import json

        data = json.loads(p.read_text())
        config = AutoConfig.for_model(data.pop("model_type", ""), **data)
    else:
        raise CLIError(f"--config {path}: no such folder or file")
    try:
        family = family_for(config)
    except UnknownModel as e:
        raise CLIError(f"--config {path}: {e}") from e
    if not family.counts_vary_with_image:
        raise CLIError(
            f"--config {path}: a {family.name} model's visual count does not depend on the image size "
            "(not LLaVA-NeXT); use --visual-tokens N instead"
        )
    return config, family


def run_inspect(args: argparse.Namespace) -> int:
    from fitprune_fx.recipe import Recipe, RecipeError

    try:
        recipe = Recipe.load(args.recipe)
    except (RecipeError, OSError) as e:
        raise CLIError(f"cannot load recipe {args.recipe}: {e}") from e
    if args.plot:
        check_output_path("--plot", args.plot)
    if args.image or args.model or args.question:
        return run_kept_picture(args, recipe)
    n = args.visual_tokens
    if n is not None and n < 1:
        raise CLIError(f"--visual-tokens {n}: give a positive number of visual tokens")
    sizes = [_parse_image_size(t) for t in args.image_size]
    if sizes and n is not None:
        raise CLIError("give --visual-tokens or --image-size, not both")
    counts: list[tuple[str, int | None]] = [("", n)]
    if sizes:
        config, family = _image_size_config(args.config)
        counts = [(f"image {h}x{w} (height x width)", family.image_tokens(config, h, w)) for h, w in sizes]
    print(recipe.describe())
    if recipe.fit:
        print("fit: " + ", ".join(f"{k} {v}" for k, v in recipe.fit.items()))
    fractions = recipe.units == "fraction"
    how = "fractions of the tokens present" if fractions else "deletions scaled proportionally"
    for label, count in counts:
        print()
        if label:
            print(f"{label}: {count} visual tokens; deleted per layer {recipe.deletions_for(count)} ({how}):")
        elif count is not None:
            print(f"scaled to {count} visual tokens ({how}):")
        print(recipe.flops_report(num_text_tokens=args.text_tokens, num_visual=count))
    n = counts[0][1]
    if args.plot:
        from fitprune_fx.kept_picture import plot_tokens

        try:
            plot_tokens(recipe, args.plot, n)
        except ImportError as e:
            raise CLIError(f"--plot needs matplotlib: {PLOT_HINT}") from e
        print(f"wrote {args.plot}")
    return 0


def run_kept_picture(args: argparse.Namespace, recipe) -> int:
    """`inspect --model M --image IMG --question Q --plot PNG`: what the recipe keeps of the image."""
    if not (args.image and args.model and args.question and args.plot):
        raise CLIError("the kept-patch picture needs --model, --image, --question and --plot together")
    if not Path(args.image).is_file():
        raise CLIError(f"--image {args.image}: no such file")
    from PIL import Image

    from fitprune_fx.calibration import build_prompt
    from fitprune_fx.kept_picture import NoTokenGrid, draw, kept_picture
    from fitprune_fx.testbed import synthetic
    from fitprune_fx.testbed.shapes_model import MODEL_DIRS

    model, processor = _load_model(args.model, "cpu", "float32")
    tasks = {
        str(MODEL_DIRS["shapes"].resolve()): synthetic.SHAPES,
        str(MODEL_DIRS["clutter"].resolve()): synthetic.CLUTTER,
    }
    task = tasks.get(str(Path(args.model).resolve()))  # a test-bed model: its own prompt
    text = synthetic.prompt(args.question, task) if task else build_prompt(processor, args.question)
    try:
        picture = kept_picture(model, processor, recipe, Image.open(args.image), text)
    except (NoTokenGrid, ValueError) as e:
        raise CLIError(str(e)) from e
    draw(
        picture, args.plot, f"{recipe.scorer}, {100 * picture.reduction:.0f}% FLOPs saved: {args.question!r}"
    )
    for view in picture.views:
        kept = ", ".join(
            f"after layer {i}: {int(k.sum())}" for i, k in zip(picture.layers, view.kept, strict=True)
        )
        print(f"{view.grid.rows}x{view.grid.cols} patches; kept {kept}")
    print(f"wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------------- demo
def add_compiler_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compiler",
        choices=["inductor", "eager"],
        default="inductor",
        help="inductor (default), or eager to run the rewritten graph uncompiled (no compile wait)",
    )


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="fit, compile and evaluate on the shipped shapes-llava model",
        description=(
            "On the small LLaVA shipped with fitprune-fx: fit a recipe for --budget on generated "
            "calibration questions, compile the model with it, check the compiled model against the "
            "eager reference, and print accuracy and prefill latency unpruned vs pruned."
        ),
    )
    p.add_argument("--budget", type=float, default=0.5, help="FLOPs reduction to fit for (default 0.5)")
    p.add_argument("--calibration", type=int, default=32, help="calibration questions (default 32)")
    p.add_argument("--eval", type=int, default=256, help="held-out questions (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward call (default 16)")
    add_compiler_option(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    if not 0.0 < args.budget < 1.0:
        raise CLIError(f"--budget {args.budget}: give a fraction in (0, 1), e.g. 0.5 for 50%")
    from fitprune_fx.testbed.demo import run_demo as demo  # torch and transformers load here

    return demo(args)


# ----------------------------------------------------------------------------------- eval
EVAL_HINT = 'pip install "fitprune-fx[eval]"'


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model with lmms-eval, unpruned and pruned by a recipe",
        description=(
            "Run lmms-eval's evaluator on --tasks twice with one model: unpruned, then compiled with "
            "--recipe. Prints each task's metrics for both runs, the recipe's FLOPs reduction and the "
            "median prefill time of each run. Needs the [eval] extra. The tasks fitprune_shapes and "
            "fitprune_shapes_sizes (the same questions on images of six sizes) are local tasks made "
            "from the synthetic shapes questions (no downloads); other tasks are "
            "lmms-eval's own (gqa, pope, mme, textvqa_val, ...), which download their data."
        ),
    )
    p.add_argument(
        "--model", default=None, help="save_pretrained model folder (default: the shipped shapes-llava)"
    )
    p.add_argument("--recipe", required=True, help="recipe JSON (from fitprune-fx fit, or recipes/)")
    p.add_argument(
        "--tasks", required=True, help="comma-separated lmms-eval tasks, e.g. gqa,pope or fitprune_shapes"
    )
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--include-path", default=None, help="folder holding more task YAMLs")
    p.add_argument("--batch-size", type=int, default=8, help="requests per generate call (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, or auto (default)")
    p.add_argument(
        "--scorers",
        metavar="FILE.py",
        help="a Python file that registers scorers (fitprune_fx.register_scorer) the recipe names",
    )
    add_compiler_option(p)
    p.set_defaults(func=run_eval)


def load_scorer_file(path: str) -> None:
    """Run a user's Python file that registers scorers (`register_scorer`), as a module of its own."""
    import importlib.util

    if not Path(path).is_file():
        raise CLIError(f"--scorers {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"fitprune_user_scorers_{Path(path).stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def run_eval(args: argparse.Namespace) -> int:
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        raise CLIError(f"lmms-eval is not installed: {EVAL_HINT}") from e
    from fitprune_fx.recipe import Recipe, RecipeError

    try:
        recipe = Recipe.load(args.recipe)
    except (RecipeError, OSError) as e:
        raise CLIError(f"cannot load recipe {args.recipe}: {e}") from e
    if args.scorers:
        load_scorer_file(args.scorers)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CLIError("--tasks: give at least one task name")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit {args.limit}: give a positive number of documents")
    import tempfile

    import torch

    import fitprune_fx
    from fitprune_fx.lmms_run import evaluate, table
    from fitprune_fx.testbed.lmms_task import SIZES_TASK, TASK, write_shapes_task
    from fitprune_fx.testbed.shapes_model import MODEL_DIR

    model, processor = _load_model(args.model or str(MODEL_DIR), args.device, args.dtype)
    include = args.include_path
    with tempfile.TemporaryDirectory() as scratch:
        if include is None:
            for local in {TASK, SIZES_TASK} & set(tasks):
                include = write_shapes_task(scratch, n=args.limit or 64, task=local)
        runs = []
        # the same compile path for both runs: the unpruned one through the backend with an empty recipe
        for label, run_recipe in (("unpruned", Recipe(model=recipe.model, prune={})), ("pruned", recipe)):
            torch._dynamo.reset()
            fitprune_fx.compile(model, run_recipe, compiler=args.compiler)
            print(f"fitprune-fx eval: {label} run on {', '.join(tasks)}", file=sys.stderr)
            runs.append(evaluate(model, processor, tasks, include, args.limit, args.batch_size))
    model.fitprune_backend.require_pruned()  # the last run: the pruned one
    print(table(runs[0], runs[1], recipe.reference_reduction()))
    return 0


# ----------------------------------------------------------------------------------- convert
def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-llava-hr",
        help="convert an official LLaVA-HR checkpoint into a transformers folder",
        description=(
            "Read an official LLaVA-HR checkpoint folder (config.json with the mm_* fields, "
            "pytorch_model*.bin or model*.safetensors) and write a folder that "
            "LlavaHrForConditionalGeneration.from_pretrained (or AutoModelForImageTextToText after "
            "`import fitprune_fx.models.llava_hr`) loads, with its image processor."
        ),
    )
    p.add_argument("src", help="official checkpoint folder")
    p.add_argument("dst", help="output folder (created)")
    p.add_argument(
        "--clip-config",
        default=None,
        help="config.json (or folder) of the CLIP tower, when the checkpoint names one not found here",
    )
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from fitprune_fx.models.llava_hr.convert import ConversionError, convert_llava_hr

    if not Path(args.src).is_dir():
        raise CLIError(f"{args.src}: not a folder (expected an official LLaVA-HR checkpoint folder)")
    try:
        config, text_side = convert_llava_hr(args.src, args.dst, clip_config=args.clip_config)
    except ConversionError as e:
        raise CLIError(str(e)) from e
    tokens = config.fast_grid() ** 2
    print(
        f"wrote {args.dst}: LLaVA-HR, {config.text_config.num_hidden_layers}-layer decoder, "
        f"{config.image_size}-px images -> {tokens} visual tokens each "
        f"(CLIP at {config.fast_image_size()} px, ConvNeXt {config.slow_grid()}x{config.slow_grid()}); "
        f"{text_side}"
    )
    return 0


# ----------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitprune-fx", description="FitPrune visual-token pruning for multimodal LLMs."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_fit_parser(subparsers)
    add_inspect_parser(subparsers)
    add_demo_parser(subparsers)
    add_eval_parser(subparsers)
    add_convert_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fitprune-fx`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except CLIError as e:
        print(f"fitprune-fx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NotPruned as e:
        print(f"fitprune-fx {args.command}: not pruned: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `fitprune-fx inspect ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # as a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
