"""`embedding-gateway space record|diff`: make a pinned space file, compare two of them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from config.profiles import ModelProfile
from config.settings import ConfigError, GatewaySettings, load_settings

EXIT_SAME, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2


def cmd_record(args: argparse.Namespace) -> int:
    from gateway.cli import configure_logging

    settings = load_settings(args.config, load_spaces=False)  # the file to pin may not exist yet
    configure_logging("error")
    if args.model not in {m.name for m in settings.models}:
        raise ConfigError(f"model {args.model!r} is not in [[models]] {[m.name for m in settings.models]}")
    return asyncio.run(_record(args, settings))


async def _record(args: argparse.Namespace, settings: GatewaySettings) -> int:
    from backends.errors import BackendError
    from gateway.consistency.checker import Checker
    from gateway.consistency.probes import probe_set
    from gateway.consistency.space import build
    from gateway.runtime import Runtime

    runtime = Runtime(settings, background=False)
    runtime.start()
    assert runtime.health is not None
    try:
        model = args.model
        group = sorted((st for st in runtime.states if st.backend.model == model), key=lambda st: st.backend.priority)
        cfg = next(m for m in runtime.settings.models if m.name == model)
        names = args.backend or [cfg.reference or (group[0].backend.name if group else None)]
        chosen = [next((s for s in group if s.backend.name == n), None) for n in names]
        missing = [n for n, s in zip(names, chosen, strict=True) if s is None]
        if missing:
            print(f"embedding-gateway: backend {missing[0]!r} does not serve model {model!r}", file=sys.stderr)
            return EXIT_ERROR
        states = [s for s in chosen if s is not None]
        st = states[0]  # recorded from; the others must agree with it
        loop = asyncio.get_running_loop()
        end = loop.time() + args.wait
        while True:
            for s in states:
                await runtime.health.check(s)
            if all(s.healthy for s in states) or loop.time() >= end:
                break
            await asyncio.sleep(0.5)
        profile = runtime.profiles[model]
        try:
            info = await st.backend.describe()
        except BackendError:
            info = None
        limit = min(profile.max_input_tokens, (info.max_input_tokens if info else None) or profile.max_input_tokens)
        probes = probe_set(limit)
        checker = Checker(model, profile, [st], st.backend.name, calls=runtime.service.router.calls)
        vectors = await checker.probe_vectors(st, probes)
        if isinstance(vectors, BackendError):
            print(
                f"embedding-gateway: {st.backend.name} could not embed the probes: {vectors.message}", file=sys.stderr
            )
            return EXIT_ERROR
        for other in states[1:]:  # several backends: they must agree, or nothing is written
            theirs = await checker.probe_vectors(other, probes)
            if isinstance(theirs, BackendError):
                print(
                    f"embedding-gateway: {other.backend.name} could not embed the probes: {theirs.message}",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            cos = {k: float(vectors.rows[k] @ theirs.rows[k]) for k in vectors.rows.keys() & theirs.rows.keys()}
            worst = min(cos, key=lambda k: cos[k]) if cos else None
            if worst is None or cos[worst] < profile.agree_cosine:
                where = f"min cosine {cos[worst]:.5f} on probe '{probes[worst[1]].name}'" if worst else "no probe"
                print(
                    f"embedding-gateway: {st.backend.name} and {other.backend.name} disagree ({where}); nothing "
                    "written. Run embedding-gateway check to see why, fix the one that is wrong, record again",
                    file=sys.stderr,
                )
                return EXIT_DIFFERENT
        meta = {
            "backend": st.backend.name,
            "confirmed_by": [s.backend.name for s in states[1:]],
            "kind": st.backend.kind,
            "info": {
                "model_id": info.model_id if info else None,
                **({k: v for k, v in info.extra.items() if isinstance(v, (str, int, float))} if info else {}),
            },
        }
        doc = build(model, profile, probes, vectors.rows, meta)
    finally:
        await runtime.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"recorded space {doc['space_id']} for model {model!r} on {st.backend.name} ({len(probes)} probes) to {out}")
    return EXIT_SAME


def cmd_diff(args: argparse.Namespace) -> int:
    from gateway.consistency.space import SpaceError, load

    try:
        a, b = load(Path(args.a)), load(Path(args.b))
    except SpaceError as exc:
        print(f"embedding-gateway: {exc}", file=sys.stderr)
        return EXIT_ERROR
    agree = ModelProfile.model_fields["agree_cosine"].default
    warn = ModelProfile.model_fields["warn_cosine"].default
    per_probe: dict[str, float] = {}
    if a.profile.get("dimension") != b.profile.get("dimension"):
        verdict = "different"
        detail = f"dimension {a.profile.get('dimension')} vs {b.profile.get('dimension')}"
    else:
        index_b = {(n, b.probes[i].text): v for (n, i), v in b.rows.items()}
        for (n, i), v in a.rows.items():
            w = index_b.get((n, a.probes[i].text))
            if w is not None:
                key = a.probes[i].name
                per_probe[key] = min(per_probe.get(key, 1.0), float(v @ w))
        if not per_probe:
            print("embedding-gateway: the two spaces share no probe to compare", file=sys.stderr)
            return EXIT_ERROR
        lo = min(per_probe.values())
        verdict = "same space" if lo >= warn else "precision drift" if lo >= agree else "different"
        detail = f"min cosine {lo:.6f} over {len(per_probe)} probes"
    code = EXIT_DIFFERENT if verdict == "different" else EXIT_SAME
    if args.json:
        body = {"a": a.space_id, "b": b.space_id, "verdict": verdict, "detail": detail, "per_probe": per_probe}
        print(json.dumps({**body, "exit_code": code}, indent=2))
    else:
        print(f"{a.space_id}  vs  {b.space_id}")
        for name, c in sorted(per_probe.items(), key=lambda kv: kv[1]):
            print(f"  {name:<20} {c:.6f}")
        print(f"{verdict.upper()}: {detail}")
    return code


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    space = sub.add_parser("space", help="record a model's embedding space to pin it; compare two spaces")
    cmds = space.add_subparsers(dest="space_command", required=True)
    rec = cmds.add_parser("record", help="embed the probe set on one backend and write a space file")
    rec.add_argument("--config", help="TOML file (default: $EMBEDDING_GATEWAY_CONFIG)")
    rec.add_argument("--model", required=True)
    rec.add_argument(
        "--backend",
        action="append",
        help="record on this backend (default: the model's reference, else its first by priority); repeat it to "
        "have others confirm: when any disagrees with the first, nothing is written (exit 1)",
    )
    rec.add_argument("--out", required=True, help="the space file to write (e.g. spaces/NAME.json)")
    rec.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the backend to come up")
    rec.set_defaults(func=cmd_record)
    diff = cmds.add_parser("diff", help="compare two space files: exit 0 same or drift, 1 different, 2 unreadable")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(func=cmd_diff)
