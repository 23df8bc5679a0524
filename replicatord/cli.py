"""The `replicatord` command: run, check-config, preflight, provision, iam, status, verify, backfill, dlq,
pause, resume, load, demo.

Every user error ends as one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from replicatord.aws import StartupError
from replicatord.config import (
    ConfigError,
    Settings,
    Topology,
    load_topology,
    proxy_password_in_file,
    redact_url,
    resolve_settings,
)
from replicatord.local.load_args import add_arguments as add_load_arguments

log = logging.getLogger("replicatord")

EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_STARTUP = 4
EXIT_PREFLIGHT = 5  # preflight: a call was refused, or a resource is missing

# `load` and `demo` need the `local` extra, which a production install leaves out: faker for the
# generated items, and for the demo moto's server (moto[server] brings flask) in the emulator
# processes it starts. Checked before their modules are imported, so that a missing extra is one
# line naming it instead of a traceback (or, for the demo, emulators dying in subprocesses).
LOCAL_EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "load": ("faker",),
    "demo": ("faker", "moto", "flask"),
}


class MissingExtra(Exception):
    """A subcommand needs an optional dependency group that is not installed; one line."""


def require_local_extra(command: str) -> None:
    """Raise MissingExtra unless every module `command` needs from the `local` extra is importable.

    Looks the modules up without importing them: importing moto alone takes most of a second.
    """
    missing = [name for name in LOCAL_EXTRA_MODULES[command] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(
            f"'replicatord {command}' needs the 'local' extra ({', '.join(missing)} not installed): "
            "pip install 'replicatord[local]'"
        )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # botocore logs credentials lookups and request bodies at debug; keep it quiet.
    for noisy in ("botocore", "aiobotocore", "aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_config(parser: argparse.ArgumentParser, region: bool = True) -> None:
    parser.add_argument("--config", "-c", required=True, help="topology YAML file")
    if region:
        parser.add_argument("--region", help="this daemon's region (or REPLICATORD_REGION)")


def _settings(args: argparse.Namespace) -> Settings:
    topology = load_topology(args.config)
    return resolve_settings(
        topology,
        args.region,
        getattr(args, "instance_id", None),
        getattr(args, "metrics_listen", None),
    )


def cmd_run(args: argparse.Namespace) -> int:
    from replicatord.daemon import Daemon

    settings = _settings(args)
    try:
        import uvloop

        runner: Callable[..., object] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works without it
        runner = asyncio.run
    runner(Daemon(settings).run())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(describe_plan(settings))
    for region, config in settings.topology.regions.items():
        if proxy_password_in_file(config):
            print(f"warning: regions.{region}.proxy holds a password, in a file every user of the host can read: "
                  f"give the URL without it and name the variable that holds it with "
                  f"regions.{region}.proxy_password_env (in /etc/replicatord/replicatord.env, mode 0600)",
                  file=sys.stderr)
    if args.live:
        print()
        return cmd_preflight(args)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from replicatord.ops.preflight import passed, preflight, render

    settings = _settings(args)
    outcomes, identity = _run_ops(preflight(settings.topology, settings.region))
    print(render(outcomes, identity, settings.region))
    return 0 if passed(outcomes) else EXIT_PREFLIGHT


def describe_plan(settings: Settings) -> str:
    """The resolved plan for one region, as `check-config` prints it."""
    t: Topology = settings.topology
    me = settings.me
    lines = [
        f"region {settings.region} (instance {settings.instance_id})",
        f"  AWS endpoint: {me.endpoint_url or 'default for ' + settings.region}",
        "  local credentials: default chain (instance profile)",
        f"  lease table: {me.lease_table}; stats: {me.stats_table}, {me.loader_stats_table}",
        f"  dead-letter queue: {me.dead_letter_queue}",
        f"  metrics: http://{settings.metrics_host}:{settings.metrics_port}/metrics (/healthz, /readyz)",
        f"  conflict: timestamp {t.conflict.timestamp_attribute!r}, region {t.conflict.region_attribute!r}, "
        f"delete marker {t.conflict.marker_attribute!r}",
    ]
    for peer in settings.peers:
        target = t.regions[peer]
        if settings.peer_uses_own_role(peer):
            creds = "this instance's own role (same partition)"
        elif target.credentials:
            creds = (f"SSM {target.credentials.ssm_prefix}AccessKey + {target.credentials.ssm_prefix}SecretKey "
                     f"(SecureString) in {settings.region}")
        else:
            creds = "MISSING (regions." + peer + ".credentials)"
        lines += [
            f"  peer {peer}:",
            f"    endpoint: {target.endpoint_url or 'default for ' + peer}",
            f"    proxy: {redact_url(target.proxy) if target.proxy else 'none (direct)'}",
            f"    credentials: {creds}",
        ]
    for pair in t.pairs:
        lines.append(f"  pair {pair.name}:")
        lines.append(
            f"    forwarder: DynamoDB stream of {pair.tables[settings.region]} -> "
            + ", ".join(f"Kinesis {pair.streams[p]} ({p})" for p in settings.peers)
        )
        lines.append(f"    applier: Kinesis {pair.streams[settings.region]} -> table {pair.tables[settings.region]}")
        outbox = settings.me.outbox
        if outbox is None:
            lines.append("    outboxes: none (a peer that does not answer holds up every peer)")
        else:
            lines += [
                f"    shipper:{peer}: Kinesis {pair.outbox_stream(settings.region, peer)} (outbox, "
                f"{outbox.retention_hours} h) -> Kinesis {pair.streams[peer]} ({peer})" for peer in settings.peers]
    return "\n".join(lines)


def cmd_provision(args: argparse.Namespace) -> int:
    from replicatord.ops.provision import provision

    topology = load_topology(args.config)
    if args.template_dir is not None:
        from pathlib import Path

        from replicatord.ops.cloudformation import write_templates

        if args.store_peer_credentials or args.access_key_id or args.secret_file:
            raise ConfigError(["--template-dir: writes templates only; store the peer credentials with "
                               "--store-peer-credentials in a run of its own"])
        write_templates(topology, Path(args.template_dir), regions=args.only_region, report=print)
        return 0
    return provision(topology, regions=args.only_region, store_peer_credentials=args.store_peer_credentials,
                     access_key_id=args.access_key_id, secret_file=args.secret_file)


def cmd_status(args: argparse.Namespace) -> int:
    from replicatord.ops.status import collect, render, watch
    from replicatord.ops.tables import parse_profiles

    topology = load_topology(args.config)
    if args.region and args.region not in topology.regions:
        raise ConfigError([f"--region: {args.region!r} is not in the topology"])
    regions = [args.region] if args.region else None
    profiles = parse_profiles(args.profile, topology)
    if args.watch:
        try:
            _run_ops(watch(topology, args.pair, regions, profiles, args.json, args.watch))
        except KeyboardInterrupt:
            return 0
        return 0
    status = _run_ops(collect(topology, args.pair, regions, profiles))
    print(json.dumps(status, indent=2, default=str) if args.json else render(status))
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from replicatord.ops.dead_letters import dlq, render
    from replicatord.ops.tables import parse_profiles

    topology = load_topology(args.config)
    if args.region not in topology.regions:
        raise ConfigError([f"--region: {args.region!r} is not in the topology"])
    if args.action == "show" and not args.id:
        raise ConfigError(["dlq show: --id is required (the letter id that 'dlq list' prints)"])
    if args.limit is not None and args.limit < 1:
        raise ConfigError([f"--limit: at least 1, got {args.limit}"])
    result = _run_ops(dlq(topology, args.region, args.action, args.pair, args.reason, args.id, args.yes,
                          parse_profiles(args.profile, topology), args.limit))
    print(render(args.action, result, args.json, show_payload=args.action == "show"))
    if args.action == "purge" and result.get("refused"):
        print("error: dlq purge deletes messages: give --yes", file=sys.stderr)
        return EXIT_USAGE
    return 1 if args.action == "redrive" and result.get("dead_lettered_again") else 0


def cmd_pause(args: argparse.Namespace) -> int:
    from replicatord.ops.pause import set_paused
    from replicatord.ops.tables import parse_profiles

    topology = load_topology(args.config)
    print(_run_ops(set_paused(topology, args.pair, args.direction, args.command == "pause",
                              parse_profiles(args.profile, topology))))
    return 0


def _run_ops(coroutine: Any) -> Any:
    """Run an operator command's work; an AWS error ends it with one line (exit 4)."""
    from replicatord.errors import ReplicatorError

    try:
        return asyncio.run(coroutine)
    except ReplicatorError as exc:
        raise StartupError(str(exc)) from None


def cmd_verify(args: argparse.Namespace) -> int:
    from replicatord.ops.tables import parse_profiles
    from replicatord.ops.verify import report, verify

    topology = load_topology(args.config)
    if args.reference is not None and args.reference not in topology.regions:
        raise ConfigError([f"--reference: {args.reference!r} is not in the topology"])
    results = _run_ops(verify(topology, args.pair, args.reference, args.repair, args.segments, args.rate,
                              args.recheck_s, parse_profiles(args.profile, topology), progress=not args.json))
    text, code = report(results, args.json, args.repair)
    print(text)
    return int(code)


def cmd_backfill(args: argparse.Namespace) -> int:
    from replicatord.ops.backfill import backfill
    from replicatord.ops.tables import parse_profiles

    topology = load_topology(args.config)
    if args.source not in topology.regions:
        raise ConfigError([f"--from: {args.source!r} is not in the topology"])
    if args.pair is None:
        raise ConfigError(["--pair: required (the pair whose table is copied)"])
    for target in args.to or []:
        if target not in topology.regions or target == args.source:
            raise ConfigError([f"--to: {target!r} is not a peer of {args.source} in the topology"])
    summary = _run_ops(backfill(topology, args.pair, args.source, args.rate, args.segments, args.restart,
                                parse_profiles(args.profile, topology), show_progress=not args.json,
                                targets=args.to))
    print(json.dumps(summary.to_json(), indent=2) if args.json else "\n".join(summary.describe()))
    return 0 if summary.complete and not summary.counts["failed"] else 1


def _add_ops_options(parser: argparse.ArgumentParser, rate: bool = True) -> None:
    parser.add_argument("--config", "-c", required=True, help="topology YAML file")
    parser.add_argument("--pair", help="only this pair (default: every pair)")
    parser.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    parser.add_argument("--profile", action="append", metavar="REGION=PROFILE",
                        help="AWS profile for a region's calls (repeatable; default: the default chain)")
    if rate:
        parser.add_argument("--rate", type=float, default=1000.0,
                            help="items read per second per region at most (default 1000; 0: no limit)")
        parser.add_argument("--segments", type=int, default=4, help="parallel scan segments per table (default 4)")


def cmd_iam(args: argparse.Namespace) -> int:
    from pathlib import Path

    from replicatord.iam import Accounts, policies, write_policies

    topology = load_topology(args.config)
    accounts = Accounts.parse(args.account, topology)
    warning = accounts.placeholder_warning(topology)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    documents = policies(topology, accounts)
    if args.out is None:
        print(json.dumps(documents, indent=2))
        return 0
    try:
        written = write_policies(documents, Path(args.out))
    except OSError as exc:
        raise ConfigError([f"--out: cannot write the policies: {exc}"]) from None
    for path in written:
        print(path)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    require_local_extra("load")
    from replicatord.local import load

    return load.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    require_local_extra("demo")
    from replicatord.local.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replicatord", description=__doc__)
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon for one region")
    _add_config(run)
    run.add_argument("--instance-id", help="lease owner name (or REPLICATORD_INSTANCE_ID; default host-pid)")
    run.add_argument("--metrics-listen", help="HOST:PORT for /metrics (or REPLICATORD_METRICS_LISTEN)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate the topology and print one region's plan")
    _add_config(check)
    check.add_argument("--metrics-listen")
    check.add_argument("--live", action="store_true",
                       help="then run the preflight: one harmless call of every kind, with this host's credentials")
    check.set_defaults(func=cmd_check_config)

    pre = sub.add_parser("preflight", help="one harmless call of every kind the daemon makes, with this host's "
                                           "credentials: allowed or refused, and the statement to add")
    _add_config(pre)
    pre.set_defaults(func=cmd_preflight)

    prov = sub.add_parser("provision", help="create tables, streams, queues and the lease table (idempotent), "
                                             "or write CloudFormation templates of them (--template-dir)")
    _add_config(prov, region=False)
    prov.add_argument("--only-region", action="append", help="provision only this region (repeatable)")
    prov.add_argument(
        "--store-peer-credentials",
        nargs=2,
        metavar=("IN_REGION", "FOR_PEER"),
        help="store FOR_PEER's access key pair in SSM of IN_REGION: the access key id from --access-key-id, the "
        "secret from --secret-file or a prompt that does not echo it (or stdin: two lines, id then secret)",
    )
    prov.add_argument("--access-key-id", help="with --store-peer-credentials: the access key id (not secret)")
    prov.add_argument("--secret-file", metavar="PATH",
                      help="with --store-peer-credentials: a file (mode 600) whose first line is the secret key")
    prov.add_argument("--template-dir", metavar="DIR",
                      help="create nothing: write one CloudFormation template per region, DIR/<region>.yaml (the "
                      "production path; with --only-region, those regions only)")
    prov.set_defaults(func=cmd_provision)

    st = sub.add_parser("status", help="per pair and direction: positions, time to data loss, pauses, "
                                       "dead letters, peers, leases")
    _add_ops_options(st, rate=False)
    st.add_argument("--region", help="only directions to or from this region, and its queue and leases")
    st.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS",
                    help="show again every SECONDS (default 5) until interrupted")
    st.set_defaults(func=cmd_status)

    dq = sub.add_parser("dlq", help="the dead-letter queue: list, show, redrive, purge")
    dq.add_argument("action", choices=("list", "show", "redrive", "purge"))
    _add_ops_options(dq, rate=False)
    dq.add_argument("--region", required=True, help="whose queue")
    dq.add_argument("--reason", help="only letters with this reason")
    dq.add_argument("--id", help="only the letter with this id (a prefix is enough)")
    dq.add_argument("--yes", action="store_true", help="purge: yes, delete them")
    dq.add_argument("--limit", type=int, help="look at this many matching letters at most (list and show: 1000)")
    dq.set_defaults(func=cmd_dlq)

    for name, what in (("pause", "stop"), ("resume", "restart")):
        pr = sub.add_parser(name, help=f"{what} forwarding of one direction of a pair (positions are kept)")
        pr.add_argument("--config", "-c", required=True, help="topology YAML file")
        pr.add_argument("--pair", required=True)
        pr.add_argument("--direction", required=True, metavar="SOURCE:TARGET")
        pr.add_argument("--profile", action="append", metavar="REGION=PROFILE")
        pr.set_defaults(func=cmd_pause)

    ver = sub.add_parser("verify", help="compare a pair's tables across regions; --repair makes them identical")
    _add_ops_options(ver)
    ver.add_argument("--repair", action="store_true",
                     help="write each difference's winner (newer version or live tombstone) to the other side")
    ver.add_argument("--reference", help="the region every other is compared with (default: the first)")
    ver.add_argument("--recheck-s", type=float, default=5.0,
                     help="wait before reading apparent differences again (changes in flight; default 5)")
    ver.set_defaults(func=cmd_verify)

    bf = sub.add_parser("backfill", help="copy the items a region's table holds to every peer, by version; resumable")
    _add_ops_options(bf)
    bf.add_argument("--from", dest="source", required=True, metavar="REGION", help="the region to copy from")
    bf.add_argument("--to", action="append", metavar="REGION",
                    help="copy only into this peer (repeatable; default: every peer), e.g. a region being added")
    bf.add_argument("--restart", action="store_true", help="start over instead of continuing a stored backfill")
    bf.set_defaults(func=cmd_backfill)

    iam = sub.add_parser("iam", help="least-privilege IAM policies of every identity, generated from the topology")
    iam.add_argument("--config", "-c", required=True, help="topology YAML file")
    iam.add_argument("--account", action="append", metavar="REGION=ACCOUNT_ID",
                     help="the account id of a region (repeatable; default: a placeholder per partition)")
    iam.add_argument("--out", metavar="DIR",
                     help="write one file per policy into DIR (default: one JSON object, name -> policy, on stdout)")
    iam.set_defaults(func=cmd_iam)

    # Their help works without the extra (it is what tells a production host the extra is needed).
    needs_local = "Needs the 'local' extra: pip install 'replicatord[local]'."
    ld = sub.add_parser(
        "load",
        help="write test items (compatible with the sample's load_items.py; needs the 'local' extra)",
        description="Write test items, like the original sample's load_items.py. " + needs_local,
    )
    add_load_arguments(ld)
    ld.set_defaults(func=cmd_load)

    demo = sub.add_parser(
        "demo",
        help="emulated regions, a daemon each, load every way, verify (needs the 'local' extra)",
        description="Two (or --regions N) emulated regions, a daemon in each, a load into every region at once, "
                    "then a comparison. " + needs_local,
    )
    demo.add_argument("--regions", type=int, choices=(2, 3, 4), default=2,
                      help="cn-north-1 and ap-southeast-1; 3 adds cn-northwest-1, 4 eu-central-1 (a full mesh)")
    demo.add_argument("--items", type=int, default=1000, help="items loaded into each region")
    demo.add_argument("--processes", type=int, default=2, help="loader processes per region")
    demo.add_argument("--steady-s", type=float, default=20.0,
                      help="seconds of steady writes after the bulk load, lag measured per record (0: none)")
    demo.add_argument("--rate", type=float, default=10.0, help="steady writes per second into each region")
    demo.add_argument("--progress-s", type=float, default=1.0, help="seconds between progress lines")
    demo.add_argument("--plot", metavar="FILE.png", help="draw lag and throughput over the run (matplotlib)")
    demo.add_argument("--timeout", type=float, default=180.0, help="seconds to converge after each phase")
    demo.add_argument("--workdir", default=".demo", help="logs and generated config go here")
    demo.add_argument("--aws-behaviour", action="store_true",
                      help="emulators that behave like AWS (stream rollover every few seconds, whole-second "
                           "timestamps, iterator expiry, read limits, a little throttling and 5xx)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
