"""Convert a unified-layout run (``<idx:05d>/metadata.json`` + ``samples/NNNN.png``) to a benchmark's official layout.

``python -m benchmarks.convert --benchmark longtext --src runs/x/unified --dst runs/x/longtext``; exit 1 on problems
in the converted layout, 2 when the source cannot be read, holds no samples, or contains the destination (one line
naming the path, through jobs/entry.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchmarks
from benchmarks.common import PromptFileError, iter_unified, remove_stale_temps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--benchmark", required=True, choices=benchmarks.NAMES)
    parser.add_argument("--src", required=True, help="unified-layout run folder")
    parser.add_argument("--dst", required=True, help="official-layout output folder")
    parser.add_argument("--samples", type=int, default=None, help="samples per prompt (default: the benchmark's)")
    parser.add_argument("--model-name", default="uniar", help="oneig: model folder name")
    parser.add_argument("--pad-missing", action="store_true", help="oneig: pad missing samples with black tiles")
    parser.add_argument("--basic-edit", default=None, help="imgedit: basic_edit.json to check the keys against")
    args = parser.parse_args(argv)

    module = benchmarks.get(args.benchmark)
    samples = args.samples or module.DEFAULTS.samples_per_prompt
    check_folders(Path(args.src), Path(args.dst))
    if Path(args.dst).is_dir():
        remove_stale_temps(args.dst)  # left by a killed earlier conversion
    report = module.convert(args.src, args.dst, samples_per_prompt=samples, model_name=args.model_name,
                            pad_missing=args.pad_missing, basic_edit=args.basic_edit)
    print(f"{args.benchmark}: {report}")
    return 0 if report.ok else 1


def check_folders(src: Path, dst: Path) -> None:
    """The source must be a unified run with samples; the destination must be outside it (converting into the
    source would walk its own output)."""
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise PromptFileError(f"--dst {dst} is {'the same folder as' if d == s else 'inside'} --src {src}: choose a "
                              "destination outside the source run")
    if not any(samples for _, samples in iter_unified(src)):
        hint = f" (for a jobs.eval run: --src {src / 'images'})" if (src / "images").is_dir() else ""
        raise PromptFileError(f"--src {src} holds no samples (no <idx:05d>/samples/NNNN.png): give the unified run's "
                              f"folder{hint}")


if __name__ == "__main__":
    from jobs import entry

    entry.run(lambda argv: sys.exit(main(argv)), "convert")
