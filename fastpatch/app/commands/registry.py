"""`fastpatch registry ...`: operate the persistent patch registry (a store directory or a PostgreSQL database)
from the shell."""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys

NAME = "registry"
HELP = "publish, roll out, promote, abort, expire, roll back and audit patch sets in a registry store"
DESCRIPTION = """\
Operate a patch registry kept in a store directory (SQLite in WAL mode + content-addressed patch
files; several processes on one machine may share it) or, for a fleet of machines, in a PostgreSQL
database (--store postgresql://USER:PASSWORD@HOST:PORT/DBNAME; needs pip install "psycopg[binary]").
Serving replicas pick changes up without a restart.
Every change is audited with --actor (default: $FASTPATCH_ACTOR or the login name).

  publish NAME VERSION --patch PATCH=FILE ... [--expires ISO] [--note TEXT]
  list                              patch sets with their stable version and arms
  show NAME                         policy, rollout and every version with its status
  policy NAME [--tenants ..] [--products ..] [--regions ..] [--sites ..] [--max-edit-norm X] [--max-edit-gain X]
  activate NAME VERSION             serve VERSION to everyone outside the running arms
  rollout NAME VERSION --percent P  sticky canary (raising P keeps everyone already in)
  rollout NAME --arm ARM=VERSION:WEIGHT ...   A/B/n arms; the rest get the stable version
  promote NAME [--arm ARM] | abort NAME | pause NAME | resume NAME | rollback NAME
  expire NAME VERSION [--at ISO]    not served from that instant on (default: now)
  guard NAME {pause,abort,rollback,off} [--band METRIC=LO:HI ...]
  audit [--name NAME] | alerts [--name NAME] | metrics
  serve --tokens TOKENS.json [--host H] [--port P] [--read-timeout S]
                                    the HTTP admin API (no model); --port 0 picks a free port,
                                    the line it prints names the bound one

Only publish and policy create the store (directory, or tables in the database) when it does not exist
yet; every other action refuses a directory or database that holds no store (exit 2), so a mistyped
--store is not taken for an empty registry. Mistakes (a bad or duplicate version, a missing or
invalid patch file, an unknown set or version, a bad percentage, an unreachable database) are one line
on stderr with exit status 2; FASTPATCH_TRACEBACK=1 shows the traceback instead. A closed stdout
(`... --json audit | head`) ends the command quietly.

examples:
  fastpatch registry --store /srv/patches publish tone 1.1.0 --patch positive=positive.safetensors
  fastpatch registry --store /srv/patches rollout tone 1.1.0 --percent 10
  fastpatch registry --store /srv/patches promote tone
  fastpatch registry --store postgresql://fastpatch@db.internal/patches list
"""

SUBS = ("publish", "list", "show", "policy", "activate", "rollout", "promote", "abort", "pause", "resume",
        "rollback", "expire", "guard", "audit", "alerts", "metrics", "serve")


def add_arguments(p) -> None:
    p.add_argument("--store", default=os.environ.get("FASTPATCH_REGISTRY"),
                   help="store directory, or postgresql://USER@HOST:PORT/DBNAME (default: $FASTPATCH_REGISTRY)")
    p.add_argument("--actor", default=os.environ.get("FASTPATCH_ACTOR"), help="who makes the change (audited)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("action", choices=SUBS, metavar="ACTION", help=", ".join(SUBS))
    p.add_argument("args", nargs="*", help="NAME [VERSION]")
    p.add_argument("--patch", action="append", default=[], metavar="PATCH=FILE", help="publish: a patch file")
    p.add_argument("--expires", default=None, help="publish: expiry (ISO 8601, UTC if no zone)")
    p.add_argument("--note", default=None)
    p.add_argument("--percent", type=float, default=None, help="rollout: canary percentage")
    p.add_argument("--arm", action="append", default=[], help="rollout: ARM=VERSION:WEIGHT; promote: ARM")
    p.add_argument("--at", default=None, help="expire: when (ISO 8601; default now)")
    for f in ("tenants", "products", "regions", "sites"):
        p.add_argument(f"--{f}", nargs="+", default=None, help=f"policy: allowed {f}")
    p.add_argument("--max-edit-norm", type=float, default=None)
    p.add_argument("--max-edit-gain", type=float, default=None)
    p.add_argument("--band", action="append", default=[], help="guard: METRIC=LO:HI")
    p.add_argument("--name", default=None, help="audit/alerts: only this patch set")
    p.add_argument("--tokens", default=None, help="serve: tokens JSON file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="serve: TCP port (0: any free one; default 8080)")
    p.add_argument("--read-timeout", type=float, default=None, metavar="S",
                   help="serve: seconds a client read (headers, body) may wait before the request is dropped "
                        "(default 10)")


def _time(text: str) -> float:
    t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def _iso(ts) -> str:
    return "-" if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


def _need(args, n: int, usage: str) -> list:
    if len(args.args) != n:
        raise ValueError(f"usage: fastpatch registry {args.action} {usage}")
    return args.args


# Actions that may create the store (they write into it); the others need an existing store.
CREATES_STORE = ("publish", "policy")


def run(args) -> int:
    import sqlite3

    from ...lifecycle.governance import Governance
    from ...lifecycle.store import StoreError
    from ...lifecycle.stores import open_store
    from .common import user_error

    if not args.store:
        return user_error(args, ValueError("give --store DIR or --store postgresql://... (or set FASTPATCH_REGISTRY)"))
    db_errors: tuple = (sqlite3.DatabaseError,)
    if "://" in args.store:
        try:
            import psycopg
            db_errors += (psycopg.Error,)
        except ImportError:  # open_store says how to install it
            pass
    try:
        gov = Governance(open_store(args.store, create=args.action in CREATES_STORE), actor=args.actor)
    except (StoreError, OSError, *db_errors) as exc:
        return user_error(args, exc)
    try:
        out = _run(gov, args)
    except (ValueError, KeyError, OSError, StoreError, *db_errors) as exc:
        # a person's mistake: one line, exit 2 (FASTPATCH_TRACEBACK=1: the traceback)
        return user_error(args, exc)
    finally:
        gov.store.close()
    if out is None:
        return 0
    text = out if isinstance(out, str) else json.dumps(out, indent=1, default=str)
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say, say nothing
        _silence_stdout()
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not report the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _run(gov, args):
    a, actor = args.action, args.actor
    if a == "publish":
        name, version = _need(args, 2, "NAME VERSION --patch PATCH=FILE ...")
        if not args.patch:
            raise ValueError("publish needs at least one --patch PATCH=FILE")
        files = {}
        for item in args.patch:
            pname, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--patch {item!r}: expected PATCH=FILE")
            files[pname] = path
        rec = gov.publish(name, version, files, expires_at=_time(args.expires) if args.expires else None,
                          note=args.note, actor=actor)
        return rec if args.json else f"published {name}@{version} {rec['content_hash'][:19]}… " \
                                     f"patches={rec['patches']} sites={rec['sites']}"
    if a == "list":
        rows = []
        for name in gov.sets():
            st = gov.show(name)["rollout"]
            arms = ", ".join(f"{x['arm']}={x['version']}:{x['weight']:g}%" for x in st["arms"])
            rows.append({"name": name, "stable": st["stable"], "arms": arms, "paused": st["paused"]})
        if args.json:
            return rows
        return "\n".join(f"{r['name']:<20} stable={r['stable'] or '-':<12} {r['arms']}"
                         f"{' (paused)' if r['paused'] else ''}" for r in rows) or "(no patch sets)"
    if a == "show":
        (name,) = _need(args, 1, "NAME")
        info = gov.show(name)
        if args.json:
            return info
        lines = [f"patch set {name}",
                 f"  policy:  {json.dumps({k: v for k, v in info['policy'].items() if v is not None})}",
                 f"  rollout: stable={info['rollout']['stable']} arms={info['rollout']['arms']} "
                 f"paused={info['rollout']['paused']} guard={info['rollout'].get('guard')}"]
        for v in info["versions"]:
            lines.append(f"  {v['version']:<14} {v['status']:<16} expires={_iso(v['expires_at'])}  "
                         f"{v['content_hash'][:19]}…  published {_iso(v['published'])}")
        return "\n".join(lines)
    if a == "policy":
        (name,) = _need(args, 1, "NAME [--tenants ..] [--regions ..] ...")
        policy = {"tenants": args.tenants, "products": args.products, "regions": args.regions,
                  "sites": args.sites, "max_edit_norm": args.max_edit_norm, "max_edit_gain": args.max_edit_gain}
        if gov.store.get_set(name) is None:
            gov.create_set(name, policy=policy, actor=actor)
            return gov.show(name)["policy"]
        return gov.set_policy(name, policy, actor=actor)
    if a == "activate":
        name, version = _need(args, 2, "NAME VERSION")
        return _state(gov.activate(name, version, actor=actor), args)
    if a == "rollout":
        if args.arm:
            (name,) = _need(args, 1, "NAME --arm ARM=VERSION:WEIGHT ...")
            arms = {}
            for item in args.arm:
                arm, _, rest = item.partition("=")
                version, _, weight = rest.rpartition(":")
                if not arm or not version:
                    raise ValueError(f"--arm {item!r}: expected ARM=VERSION:WEIGHT")
                arms[arm] = (version, float(weight))
            return _state(gov.experiment(name, arms, actor=actor), args)
        name, version = _need(args, 2, "NAME VERSION --percent P")
        if args.percent is None:
            raise ValueError("rollout NAME VERSION needs --percent P")
        if not 0 <= args.percent <= 100:
            raise ValueError(f"--percent {args.percent:g}: a canary percentage is between 0 and 100")
        return _state(gov.canary(name, version, args.percent, actor=actor), args)
    if a == "promote":
        (name,) = _need(args, 1, "NAME [--arm ARM]")
        return _state(gov.promote(name, args.arm[0] if args.arm else None, actor=actor), args)
    if a in ("abort", "pause", "rollback"):
        (name,) = _need(args, 1, "NAME")
        return _state(getattr(gov, a)(name, actor=actor), args)
    if a == "resume":
        (name,) = _need(args, 1, "NAME")
        return _state(gov.resume(name, actor=actor), args)
    if a == "expire":
        name, version = _need(args, 2, "NAME VERSION [--at ISO]")
        rec = gov.expire(name, version, at=_time(args.at) if args.at else None, actor=actor)
        return rec if args.json else f"{name}@{version} expires {_iso(rec['expires_at'])}"
    if a == "guard":
        name, action = _need(args, 2, "NAME {pause,abort,rollback,off} [--band METRIC=LO:HI]")
        bands = {}
        for item in args.band:
            metric, _, rng = item.partition("=")
            lo, _, hi = rng.partition(":")
            bands[metric] = [float(lo), float(hi)]
        return _state(gov.set_guard(name, None if action == "off" else action, bands=bands, actor=actor), args)
    if a == "audit":
        entries = gov.audit(args.name)
        if args.json:
            return entries
        skip = ("id", "ts", "actor", "action", "name")
        return "\n".join(f"{e['id']:>5} {_iso(e['ts'])} {e['actor']:<10} {e['action']:<10} {e['name'] or '-':<10} "
                         + " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                    for k, v in e.items() if k not in skip and v is not None)
                         for e in entries) or "(empty)"
    if a == "alerts":
        alerts = gov.alerts(args.name)
        if args.json:
            return alerts
        return "\n".join(_alert_line(x) for x in alerts) or "(no alerts)"
    if a == "metrics":
        from ...lifecycle.telemetry import prometheus

        return prometheus(gov.store.telemetry(), alerts=len(gov.alerts()), generation=gov.store.generation())
    if a == "serve":
        from ..admin_server import AdminServer, load_tokens

        if not args.tokens:
            raise ValueError("serve needs --tokens TOKENS.json")
        kw = {} if args.read_timeout is None else {"read_timeout": args.read_timeout}
        server = AdminServer(gov, load_tokens(args.tokens), **kw)
        host, port = server.start(args.host, args.port)  # --port 0: the port the system chose
        print(f"admin API on http://{host}:{port}/v1 (store {getattr(gov.store, 'url', args.store)})", flush=True)
        server.join()
        return None
    raise ValueError(f"unknown action {a!r}")


def _alert_line(x: dict) -> str:
    head = f"{x['id']:>4} {_iso(x['ts'])} {x['name']}@{x.get('version')} arm={x.get('arm')} {x.get('metric')}: "
    if "window_mean" in x:
        return (head + f"window mean {x['window_mean']:.4g} outside [{x['band'][0]:.4g}, {x['band'][1]:.4g}] "
                f"({x.get('band_source')}) guard={x.get('guard')}")
    return head + str(x.get("error") or x.get("kind") or "alert")


def _state(state: dict, args):
    if args.json:
        return state
    arms = ", ".join(f"{x['arm']}={x['version']}:{x['weight']:g}%" for x in state.get("arms", []))
    return (f"stable={state.get('stable')} arms=[{arms}]{' paused' if state.get('paused') else ''}"
            f"{' guard=' + str(state['guard']) if state.get('guard') else ''}")
