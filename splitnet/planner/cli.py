"""``splitnet plan`` and ``splitnet profile``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitnet.errors import ConfigError, SplitnetError


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose cuts, devices and codecs for a model on a fleet",
                       description="Print the optimal plan (stages, blocks, device, codec, predicted ms and bytes).")
    p.add_argument("--model", required=True,
                   help="model name (uses its shipped profile, or measures one), or a model profile YAML")
    p.add_argument("--model-profile", help="model profile YAML (from `splitnet profile`); overrides the lookup")
    p.add_argument("--measure", action="store_true", help="measure the model profile now, on this machine")
    p.add_argument("--devices", required=True, help="fleet YAML: devices and links")
    p.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    p.add_argument("--prefill-tokens", type=int, default=128, help="tokens in a request's prefill (default 128)")
    p.add_argument("--decode-steps", type=int, default=0, help="decode steps per request (decoders; default 0)")
    p.add_argument("--concurrent-requests", type=int, default=1, help="KV caches a stage holds at once")
    p.add_argument("--fidelity-floor", type=float, default=0.99,
                   help="lowest codec fidelity allowed at a cut (default 0.99; 0 allows any codec)")
    p.add_argument("--mode", choices=("auto", "chain", "search"), default="auto",
                   help="chain: devices in the fleet's order; search: every ordering (small fleets); auto")
    p.add_argument("--json", action="store_true", help="print the plan (and sweep) as JSON")
    p.add_argument("--plot", help="write a chart of predicted latency against cut point and bandwidth (PNG)")
    p.add_argument("--sweep-bandwidth", type=_floats, help="uplink bandwidths to re-plan for, e.g. 1,5,15,100")
    p.add_argument("--out", help="write the plan file (YAML, or JSON if it ends in .json)")
    p.set_defaults(func=_cmd_plan)

    q = sub.add_parser("profile", help="measure a model's per-block compute, feature sizes and codec costs")
    q.add_argument("--model", required=True, help="built-in model name or Hugging Face directory")
    q.add_argument("--out", required=True, help="model profile YAML to write")
    q.add_argument("--tokens", type=_ints, default=[1, 32, 128], help="token counts to time (default 1,32,128)")
    q.add_argument("--repeats", type=int, default=5)
    q.add_argument("--warmup", type=int, default=2)
    q.add_argument("--codecs", default="fp16,int8,int4", help="codecs to measure at every cut ('' for none)")
    q.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1, as stages run)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_cmd_profile)


def resolve_model_profile(model: str, explicit: str | None = None, measure: bool = False):
    """A ModelProfile for ``model``: an explicit file, a YAML path, the shipped profile, or a measurement."""
    from splitnet.planner.planning import default_profile_path
    from splitnet.planner.profiles import load_model_profile

    if explicit:
        return load_model_profile(explicit), explicit
    if model.endswith((".yaml", ".yml")) and Path(model).is_file():
        return load_model_profile(model), model
    shipped = default_profile_path(model)
    if shipped is not None and not measure:
        return load_model_profile(shipped), str(shipped)
    from splitnet.planner.profiler import profile_model

    print(f"measuring a profile of {model} on this machine (use `splitnet profile` to keep one)", file=sys.stderr)
    return profile_model(model, progress=sys.stderr.isatty()), None


def _cmd_plan(args: argparse.Namespace) -> int:
    from splitnet.planner.cost import Workload
    from splitnet.planner.planning import make_plan
    from splitnet.planner.profiles import load_fleet
    from splitnet.planner.report import format_plan, format_sweep, plot_plan, sweep_bandwidth

    try:
        model, prof_file = resolve_model_profile(args.model, args.model_profile, args.measure)
        fleet = load_fleet(args.devices)
        wl = Workload(args.prefill_tokens, args.decode_steps, args.concurrent_requests, args.fidelity_floor)
        plan = make_plan(model, fleet, wl, args.objective, args.mode, prof_file)
        sweep = sweep_bandwidth(model, fleet, wl, args.objective, args.sweep_bandwidth, args.mode) \
            if args.sweep_bandwidth else None
        if args.out:
            plan.save(args.out)
        if args.plot:
            plot_plan(plan, model, fleet, wl, args.sweep_bandwidth or [1, 5, 15, 100], args.plot, args.mode)
    except SplitnetError as e:
        print(f"splitnet plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        doc = plan.to_dict()
        if sweep is not None:
            doc = {"plan": doc, "sweep": sweep}
        print(json.dumps(doc, indent=2))
    else:
        print(format_plan(plan, fleet))
        if sweep is not None:
            print()
            print(format_sweep(sweep, fleet))
        if args.out:
            print(f"\nplan written to {args.out}")
        if args.plot:
            print(f"chart written to {args.plot}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from splitnet.planner.profiler import profile_model
    from splitnet.planner.profiles import save_model_profile

    codecs = [c for c in args.codecs.split(",") if c.strip()]
    try:
        prof = profile_model(args.model, tokens=args.tokens, repeats=args.repeats, warmup=args.warmup, codecs=codecs,
                             threads=args.threads, progress=not args.no_progress)
    except (SplitnetError, ConfigError) as e:
        print(f"splitnet profile: error: {e}", file=sys.stderr)
        return 2
    save_model_profile(prof, args.out)
    total = sum(b.prefill_ms(max(args.tokens)) for b in prof.blocks)
    print(f"profile of {prof.model} ({prof.num_blocks} blocks, {prof.kind}) written to {args.out}; "
          f"blocks take {total:.2f} ms at {max(args.tokens)} tokens on {prof.reference_device}")
    return 0
