"""Build the tokenized WebDataset shards of a run: corpus -> split -> tokenizer -> shards -> manifest.

Without step flags it does everything here, with shards.build_workers processes, and prints what
it built (idempotent: an up-to-date build is verified against its manifest -- size and sha256
of every shard -- and a damaged shard is rebuilt alone; an interrupted build resumes).

On a cluster the same build runs as three steps, the middle one as a job array:

    python shards/build.py --config C --run-dir D --prepare                     # corpus, tokenizer, plan
    python shards/build.py --config C --run-dir D --slice $I --num-slices $N   # task I of N (any N)
    python shards/build.py --config C --run-dir D --finalize                    # manifest, when all are done

The shards are the same whatever the number of slices or workers. Output goes to <run-dir>/data
(or shards.dir); nothing is written inside the repository. The run directory records the config
(as launchers/submit.py does, refusing a run directory made by another config unless
--update-config) and, once the build is complete, the data stage as done: launchers/submit.py
--plan and launchers/status.py then see it.
"""

import os
import sys

# shards/inspect.py is named like the standard library's `inspect`: keep this folder off the import
# path, or `import dataclasses` (and torch, numpy) would import that script instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402

from gtl_dist.cluster.dag import Pipeline  # noqa: E402
from gtl_dist.cluster.run_dir import prepare_run_dir  # noqa: E402
from gtl_dist.cluster.tasks import write_marker  # noqa: E402
from gtl_dist.config import ConfigError, load_config  # noqa: E402
from gtl_dist.data.build import BuildError, clean, data_dir, finalize, prepare, run_slice  # noqa: E402
from gtl_dist.data.prepare import describe, prepare_data  # noqa: E402
from gtl_dist.log import setup_logging  # noqa: E402
from gtl_dist.paths import RunPaths  # noqa: E402
from gtl_dist.stages import Task  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python shards/build.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="YAML config (repeatable; later files override earlier ones)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.path=/data/arxiv.json")
    parser.add_argument("--run-dir", required=True, help="the run directory (shards go to <run-dir>/data)")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--prepare", action="store_true", help="only read the corpus, split it, train the "
                      "tokenizer and write the build plan")
    step.add_argument("--slice", type=int, metavar="I", help="only build slice I of --num-slices "
                      "(one job-array task; needs --prepare done)")
    step.add_argument("--finalize", action="store_true", help="only write the manifest (needs every slice done)")
    parser.add_argument("--num-slices", type=int, metavar="N", help="number of slices (with --slice)")
    parser.add_argument("--rebuild", action="store_true", help="delete a previous build in the output "
                        "folder first (needed when the data/tokenizer/shards config changed)")
    parser.add_argument("--update-config", action="store_true", help="let a run directory made by another "
                        "config adopt this one (as launchers/submit.py --update-config)")
    args = parser.parse_args(argv)
    if (args.slice is None) != (args.num_slices is None):
        parser.error("--slice and --num-slices go together")
    try:
        cfg = load_config(args.config, args.set)
        root = data_dir(cfg, args.run_dir)
        if args.rebuild and (args.prepare or args.slice is not None or args.finalize):
            parser.error("--rebuild goes with a full build or --prepare alone")
        if args.slice is None:
            prepare_run_dir(cfg, args.run_dir, update=args.update_config)
        if args.prepare:
            if args.rebuild:
                clean(root)
            plan = prepare(cfg, root)
            print(f"prepared {root}: {sum(len(s['units']) for s in plan['sets'].values())} build units")
        elif args.slice is not None:
            built = run_slice(root, args.slice, args.num_slices)
            print(f"slice {args.slice}/{args.num_slices}: {built} build units done in {root}")
        else:
            manifest = finalize(root) if args.finalize else prepare_data(cfg, args.run_dir, rebuild=args.rebuild)
            write_marker(Pipeline(cfg), RunPaths(args.run_dir), Task("data"), data_hash=manifest.data_hash)
            print(describe(manifest))
    except (ConfigError, BuildError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
