"""The inputs of the README's kept-patch picture: a FitPrune recipe for clutter-llava and one image.

Fits a recipe at --budget on generated calibration questions (as `benchmarks/accuracy.py` does) and
writes it with one held-out image to docs/kept-example/; the picture itself comes from the CLI:

    python benchmarks/kept_example.py
    fitprune-fx inspect docs/kept-example/clutter-70.json --model fitprune_fx/testbed/models/clutter-llava \\
        --image docs/kept-example/image.png --question "what shape is at b6 ?" --plot docs/kept.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fitprune_fx import fit
from fitprune_fx.testbed import synthetic
from fitprune_fx.testbed.shapes_model import MODEL_DIRS, encode, load_shapes_llava

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--image-seed", type=int, default=5, help="seed of the held-out question drawn")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "kept-example")
    args = p.parse_args()

    model, processor = load_shapes_llava(MODEL_DIRS["clutter"])
    calibration = synthetic.make_dataset(args.calibration, seed=0, split="calib", task=synthetic.CLUTTER)
    calib = [encode(processor, calibration[i : i + 16]) for i in range(0, len(calibration), 16)]
    recipe = fit(model, calib, args.budget, name="clutter-llava")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"clutter-{round(100 * args.budget)}.json"
    recipe.to_json(path)
    example = synthetic.make_dataset(1, seed=args.image_seed, split="test", task=synthetic.CLUTTER)[0]
    example.image.save(args.out / "image.png")
    print(
        f"wrote {path} (deletions {dict(recipe.prune)}) and {args.out / 'image.png'}: "
        f"{example.question} -> {example.answer}"
    )


if __name__ == "__main__":
    main()
