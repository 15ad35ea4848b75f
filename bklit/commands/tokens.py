"""``bklit token create|list|revoke``: API keys (``bklit.tokens``)."""

from __future__ import annotations

import argparse
import json
import time

from bklit.arguments import DOMAIN, MAX_EXPIRES_DAYS, PROJECT, split_list
from bklit.command import Failed, UsageProblem, from_stdin, redis_call, say
from bklit.config import Config
from bklit.tokens import TokenStore


async def token_create(args: argparse.Namespace, config: Config) -> None:
    projects = split_list(args.project)
    bad = [p for p in projects if not PROJECT.fullmatch(p)]
    if bad or not projects:
        raise UsageProblem(f"--project: invalid project id {bad[0] if bad else ''!r} (1-64 of A-Z a-z 0-9 _ -)")
    domains = tuple(d.lower() for d in split_list([args.domains]))
    bad = [d for d in domains if not DOMAIN.fullmatch(d)]
    if bad:
        raise UsageProblem(f"--domains: {bad[0]!r} is not a host name or *.host pattern")
    if args.expires_days is not None and not 0 < args.expires_days <= MAX_EXPIRES_DAYS:
        raise UsageProblem(f"--expires-days: must be more than 0 and at most {MAX_EXPIRES_DAYS}")
    expires_at = time.time() + args.expires_days * 86400 if args.expires_days else 0
    store = TokenStore(await redis_call(config))
    key, token = await store.create(projects, args.scope, args.name, expires_at, domains)
    if args.json:
        print(json.dumps({"key": key, **token.as_dict()}))
        return
    print(key)
    say(f"created {token.scope} key {token.id} for {', '.join(projects)}"
        + (f", name {token.name!r}" if token.name else "")
        + (f", domains {', '.join(domains)}" if domains else "")
        + (f", expires {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires_at))}" if expires_at else ""))
    say("The key is shown only this once; store it now.")


async def token_list(args: argparse.Namespace, config: Config) -> None:
    tokens = await TokenStore(await redis_call(config)).list()
    if args.json:
        print(json.dumps([t.as_dict() for t in tokens]))
        return
    print(f"{'ID':12}  {'SCOPE':6}  {'STATE':8}  {'EXPIRES':10}  {'PROJECTS':20}  NAME")
    now = time.time()
    for t in tokens:
        state = "revoked" if t.revoked else "expired" if t.expired(now) else "active"
        expires = time.strftime("%Y-%m-%d", time.gmtime(t.expires_at)) if t.expires_at else "never"
        print(f"{t.id:12}  {t.scope:6}  {state:8}  {expires:10}  {','.join(t.projects):20}  {t.name}")


async def token_revoke(args: argparse.Namespace, config: Config) -> None:
    args.token = from_stdin(args.token)
    store = TokenStore(await redis_call(config))
    found = await store.find(args.token)
    if not found:
        raise Failed(f"no token matches {args.token[:12]!r}" if not args.token.startswith("bk_") else "no token matches that key")
    if len(found) > 1:
        raise Failed(f"{len(found)} tokens match {args.token!r}; give more digits")
    await store.revoke(found[0])
    if args.json:
        print(json.dumps({"revoked": found[0].id}))
    else:
        say(f"revoked {found[0].id}")
