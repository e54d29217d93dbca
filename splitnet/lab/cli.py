"""``splitnet lab up|down|list``: build or remove namespace hosts outside of pytest (root only)."""

from __future__ import annotations

import argparse
import json


def _up(args: argparse.Namespace) -> int:
    from splitnet.lab.netns import LinkSpec, build

    hosts = args.host or ["edge-a", "edge-b", "cloud"]
    links = {}
    for text in args.link:
        try:
            a, b, spec = text.split(":", 2)
        except ValueError:
            raise SystemExit(f"splitnet lab up: --link must be A:B:rate=..,delay=..,jitter=..,loss=.., got {text!r}") from None
        links[(a, b)] = LinkSpec.parse(spec)
    lab = build(args.name, hosts, links)
    print(json.dumps({"name": lab.name, "hosts": {h: {"netns": lab.ns[h], "addr": lab.addr(h)} for h in hosts}}, indent=2))
    print(f"run a command in a host: ip netns exec {lab.ns[hosts[0]]} CMD ... ; remove: splitnet lab down --name {lab.name}")
    print("note: rates are shaped in the kernel; delay/jitter/loss apply to endpoints exposed through splitnet.lab relays")
    return 0


def _down(args: argparse.Namespace) -> int:
    from splitnet.lab.netns import destroy, list_labs

    names = [lab["name"] for lab in list_labs()] if args.all else [args.name]
    for n in names:
        print(f"removed {n}: {', '.join(destroy(n)) or 'nothing left'}")
    return 0


def _list(args: argparse.Namespace) -> int:  # noqa: ARG001
    from splitnet.lab.netns import list_labs

    print(json.dumps(list_labs(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="network-namespace test hosts with shaped links (root)")
    s = p.add_subparsers(dest="lab_command", metavar="ACTION")
    up = s.add_parser("up", help="create hosts and links")
    up.add_argument("--name", default="lab", help="lab name (1..6 letters/digits)")
    up.add_argument("--host", action="append", help="host name (repeatable; default edge-a, edge-b, cloud)")
    up.add_argument("--link", action="append", default=[], help="A:B:rate=MBIT,delay=MS,jitter=MS,loss=PCT (repeatable)")
    up.set_defaults(func=_up)
    down = s.add_parser("down", help="kill processes in a lab's hosts and delete them")
    down.add_argument("--name", default="lab")
    down.add_argument("--all", action="store_true", help="every lab recorded under /run/splitnet-lab")
    down.set_defaults(func=_down)
    from splitnet.lab import probe

    pr = s.add_parser("probe", help="run a client against stage endpoints, check it against the whole model, print JSON")
    probe.add_arguments(pr)
    pr.set_defaults(func=probe.run)
    ls = s.add_parser("list", help="labs that exist")
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
