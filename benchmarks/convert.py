"""Convert a unified-layout run (``<idx:05d>/metadata.json`` + ``samples/NNNN.png``) to a benchmark's official layout.

``python -m benchmarks.convert --benchmark longtext --src runs/x/unified --dst runs/x/longtext``; exit 1 on problems
in the converted layout, 2 when the source cannot be read (the message names the file).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import benchmarks
from benchmarks.common import PromptFileError, remove_stale_temps


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
    if Path(args.dst).is_dir():
        remove_stale_temps(args.dst)  # left by a killed earlier conversion
    try:
        report = module.convert(args.src, args.dst, samples_per_prompt=samples, model_name=args.model_name,
                                pad_missing=args.pad_missing, basic_edit=args.basic_edit)
    except (PromptFileError, FileNotFoundError, PermissionError) as e:  # the source run, named: no traceback
        print(f"{args.benchmark}: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.benchmark}: {report}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
