#!/usr/bin/env python3
"""Start, inspect and stop a real SLURM cluster on this machine, for trying the cluster path.

  python launchers/slurm_cluster.py start [--dir D] [--nodes 2] [--cpus-per-node N] [--port P]
  eval "$(python launchers/slurm_cluster.py env [--dir D])"      # sets SLURM_CONF
  sbatch --wrap hostname; srun -N2 hostname; squeue; sinfo
  python launchers/slurm_cluster.py status [--dir D]
  python launchers/slurm_cluster.py stop [--dir D]
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from gtl_dist.log import setup_logging
# The cluster's code sits beside this script (on the import path when it runs): a tool for tests
# and trials, not part of the installed package.
from slurm_local import (DEFAULT_CONTROLLER_PORT, ClusterError, ClusterSpec, LocalSlurmCluster,
                         default_state_dir)

DESCRIPTION = """\
Runs a small but real SLURM cluster on this one machine, so that `launchers/submit.py
--cluster slurm`, job arrays and two-node jobs can be tried without a cluster account:
one slurmctld, N slurmd daemons posing as nodes n1..nN (all on 127.0.0.1), and a private
munged. It is what the tests marked `slurm` start, and what .ci/run relies on.
"""

EPILOG = f"""\
what it needs:
  - the Debian/Ubuntu packages slurmctld, slurmd, slurm-client and munge:
      sudo apt-get install slurmctld slurmd slurm-client munge
    (Debian 12 ships SLURM 22.05, whose slurmd allows several daemons per host via -N).
    The packages may start the system's own munged; this script neither uses nor stops it.
  - no root: the daemons run as the user who starts them and run that user's jobs (checked
    as an unprivileged user and as root, which is how CI runs). Only jobs submitted by
    other users need the cluster started as root, because slurmd must switch to their uid.
  - no existing SLURM configuration, no systemd, no cgroups, no accounting database.

what it changes on the machine:
  - creates the state directory D (default: {default_state_dir()}) holding slurm.conf,
    a freshly generated private munge key, the munge socket, daemon state, spools and logs;
  - starts munged, slurmctld and N slurmd processes (recorded with pid and start time in
    D/cluster.json). slurmctld listens on TCP port P (default {DEFAULT_CONTROLLER_PORT}) on all
    interfaces, node i on port P+i; requests need a credential signed with the private key,
    so other machines cannot use it;
  - nothing else: /etc/munge, /etc/slurm, /etc/hosts and systemd units are not touched.
    The nodes' names n1..nN need not resolve: use their NodeAddr (127.0.0.1) from
    `scontrol show node`, as gtl_dist's launcher does for MASTER_ADDR.

`stop` cancels the cluster's jobs, sends SIGTERM to exactly the recorded daemons (SIGKILL
after a grace period), kills job steps this cluster's slurmd left behind, and only then
deletes D. It never signals a process it did not start. Jobs are not accounted: `sacct` fails;
finished jobs stay visible to `squeue -t all` / `scontrol show job` for an hour.
"""


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=str(default_state_dir()),
                        help="state directory of the cluster (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slurm_cluster.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = commands.add_parser("start", help="start the cluster and wait until all nodes are idle",
                                description="Start munged, slurmctld and the slurmd nodes; wait "
                                            "until every node is idle. Does nothing if the "
                                            "cluster in --dir is already running.")
    _add_dir(start)
    defaults = ClusterSpec()
    start.add_argument("--nodes", type=int, default=defaults.nodes,
                       help="number of simulated nodes n1..nN (default: %(default)s)")
    start.add_argument("--cpus-per-node", type=int, default=defaults.cpus_per_node,
                       help="CPUs each node offers SLURM; may exceed the real count "
                            "(default: this machine's, %(default)s)")
    start.add_argument("--port", type=int, default=DEFAULT_CONTROLLER_PORT,
                       help="slurmctld's TCP port; node i uses port+i (default: %(default)s)")
    start.add_argument("--timeout", type=float, default=60.0,
                       help="seconds to wait for the nodes to become idle (default: %(default)s)")

    for name, text in (("status", "show the daemons and node states (exit 3 if not running)"),
                       ("stop", "cancel jobs, stop exactly the daemons started, delete --dir"),
                       ("env", "print `export SLURM_CONF=...` for eval in a shell")):
        _add_dir(commands.add_parser(name, help=text, description=text))
    return parser


def cmd_start(args: argparse.Namespace) -> int:
    spec = ClusterSpec(nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                       controller_port=args.port)
    cluster = LocalSlurmCluster(args.dir, spec)
    if not cluster.start(timeout_s=args.timeout):
        print(f"already running: the cluster in {cluster.state_dir} "
              f"(nodes {', '.join(cluster.spec.node_names)})")
        return 0
    print(f"started {spec.nodes} node(s) {', '.join(spec.node_names)} with "
          f"{spec.cpus_per_node} CPU(s) each; controller on port {spec.controller_port}")
    print(f"use it with:  export SLURM_CONF={cluster.conf_path}")
    print(f"stop it with: python launchers/slurm_cluster.py stop --dir {cluster.state_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = LocalSlurmCluster(args.dir)
    status = cluster.status()
    if not status["daemons"]:
        print(f"not running: no cluster recorded in {cluster.state_dir}")
        return 3
    print(f"{'running' if status['running'] else 'NOT running'}: {cluster.state_dir}")
    print(f"SLURM_CONF={status['slurm_conf']}")
    for d in status["daemons"]:
        print(f"  {d['name']:<12} pid {d['pid']:<8} {'alive' if d['alive'] else 'gone'}")
    for node, state in status["nodes"].items():
        print(f"  node {node}: {state}")
    return 0 if status["running"] else 3


def cmd_stop(args: argparse.Namespace) -> int:
    for line in LocalSlurmCluster(args.dir).stop():
        print(line)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    cluster = LocalSlurmCluster(args.dir)
    if not cluster.is_running():
        print(f"# warning: the cluster in {cluster.state_dir} is not running "
              f"(start it: python launchers/slurm_cluster.py start --dir {cluster.state_dir})",
              file=sys.stderr)
    print(f"export SLURM_CONF={cluster.conf_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"start": cmd_start, "status": cmd_status, "stop": cmd_stop, "env": cmd_env}
    try:
        return command[args.command](args)
    except ClusterError as exc:
        print(f"slurm_cluster.py {args.command}: {textwrap.indent(str(exc), '  ').strip()}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
