#!/usr/bin/env python
"""Search for a better model and promote it only when it is really better.

  python tune.py --space search_spaces/default.yaml            # Optuna + ASHA study, champion, report
  python tune.py --space search_spaces/default.yaml --resume   # continue the latest interrupted study
  python tune.py --configs configs/exp_*.yaml                  # run a fixed list of configs the same way
  python tune.py --space search_spaces/default.yaml --cold     # do not warm-start from earlier studies' trials
  python tune.py --space search_spaces/default.yaml --improve  # scheduled step: audit, skip if unchanged, study, judge
"""
import argparse

from medseg.cli import run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", help="search space YAML (search_spaces/); with --configs it supplies study settings")
    parser.add_argument("--configs", nargs="+", help="run these config files as the trials of one study")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a search-space key")
    parser.add_argument("--name",
                        help="study name (default: <space name>-<timestamp>; with --resume: the latest study)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study without re-running finished trials")
    parser.add_argument("--address", help="existing Ray cluster (ray start --head ...), e.g. 10.0.0.5:6379")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--cold", action="store_true",
                        help="start the searcher fresh: do not tell it the trials of earlier studies")
    parser.add_argument("--no-promote", action="store_true", help="skip the champion decision")
    parser.add_argument("--improve", action="store_true",
                        help="one step of the improvement loop (medseg/improve.py): audit the data, "
                        "stop if data, space and code are unchanged since the last decision, "
                        "else a warm study under --budget-s, judged; "
                        "exit 0 promoted or not, 1 data errors, 75 another --improve of the space is running")
    parser.add_argument("--force", action="store_true", help="--improve: run even if nothing changed")
    parser.add_argument("--budget-s", type=float,
                        help="--improve: time budget of the study (default: the space's time_budget_s, else 1800)")
    args = parser.parse_args()
    if not args.space and not args.configs:
        parser.error("give --space or --configs")

    from medseg.search_space import load_space, space_for_configs
    from medseg.study import run_and_promote

    if args.improve:
        if not args.space or args.configs or args.resume or args.no_promote:
            parser.error("--improve takes --space (not --configs, --resume or --no-promote)")
        from medseg.improve import improve

        return improve(load_space(args.space, overrides=args.overrides), force=args.force, budget_s=args.budget_s,
                       address=args.address, num_cpus=args.num_cpus, cold=args.cold)
    if args.force or args.budget_s is not None:
        parser.error("--force and --budget-s go with --improve")
    template = load_space(args.space, overrides=args.overrides) if args.space else None
    if args.configs:
        space = space_for_configs(args.configs, name=args.name or "experiments", template=template)
    else:
        space = template
    # --configs: --name names the fixed-config "space" (studies are <name>-<timestamp>); with --resume, the study itself
    run_and_promote(space, resume=args.resume, name=args.name if args.resume or not args.configs else None,
                    address=args.address, num_cpus=args.num_cpus, promote=not args.no_promote, cold=args.cold)
    return 0


if __name__ == "__main__":
    run_cli(main)
