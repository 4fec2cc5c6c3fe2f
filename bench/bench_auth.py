"""Token verification cost per request: what a person's access token adds to a query API call.

    .venv/bin/python -m bench.bench_auth [--requests 20000] [--rounds 5]

Measures, in this process, the query API's own credential check (``query_api.deps.
authenticate_request``, which the request guard runs before every ``/v1/`` route) for a
person's access token: HS256 signature and claims (pyjwt), the revoked-session check and the
role lookup in the membership cache (10,000 users in 1,000 organisations loaded), giving the
Principal. The same call with an API key (the key cache holding 10,000 keys) is the baseline, so
"added" is what a token costs over a key. Per-call times are taken one call at a time with
``perf_counter_ns``; percentiles over all rounds. Target: p99 of a token check <= 0.5 ms.

No ClickHouse: both caches are filled in memory, as their loaders would.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from query_api.deps import authenticate_request
from query_api.identity import Identity
from spendstream.identity.cache import IdentityCache
from spendstream.identity.store import Snapshot
from spendstream.identity.tokens import AccessTokens
from spendstream.keys import SCOPES, KeyStore, Principal, StoredKey, hash_key, new_key
from spendstream.settings import Settings


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # µs


async def run(requests: int, rounds: int) -> dict[str, float]:
    settings = Settings(identity={"jwt_secret": "b" * 32})
    memberships = {f"usr-{i:05d}": {f"org-{i % 1000:04d}": "member"} for i in range(10_000)}
    cache = IdentityCache(lambda: asyncio.sleep(0, Snapshot(memberships, frozenset(f"s{i}" for i in range(1000)))))
    await cache.reload()
    identity = Identity.__new__(Identity)  # only the parts authenticate_request reads
    identity.cache, identity.access_tokens = cache, AccessTokens.from_settings(settings.identity)
    stored, keys_list = [], []
    for i in range(10_000):
        key_id, key = new_key()
        stored.append(StoredKey(Principal(key_id, f"org-{i % 1000:04d}", frozenset(SCOPES)), hash_key(key)))
        keys_list.append(key)

    async def load():
        return stored

    keys = KeyStore(load)
    await keys.reload()
    tokens = [identity.access_tokens.issue(f"usr-{i:05d}", f"sess-{i}") for i in range(0, 10_000, 37)]
    token_headers = [{"authorization": f"Bearer {t}"} for t in tokens]
    key_headers = [{"authorization": f"Bearer {k}"} for k in keys_list[::37]]
    timings: dict[str, list[int]] = {"token": [], "key": []}
    for _ in range(rounds):
        for name, headers_list in (("token", token_headers), ("key", key_headers)):
            samples = timings[name]
            for i in range(requests):
                headers = headers_list[i % len(headers_list)]
                start = time.perf_counter_ns()
                principal = await authenticate_request(keys, headers, identity, "/v1/analytics/overview")
                samples.append(time.perf_counter_ns() - start)
                assert principal.tenant.startswith("org-")
    out = {}
    for name, samples in timings.items():
        out[f"{name}_p50_us"] = _percentile(samples, 0.50)
        out[f"{name}_p99_us"] = _percentile(samples, 0.99)
        out[f"{name}_mean_us"] = statistics.fmean(samples) / 1000
    out["added_p99_us"] = out["token_p99_us"] - out["key_p99_us"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="calls per credential kind per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(run(args.requests, args.rounds))
    for name, value in result.items():
        print(f"{name:>16}: {value:8.1f}")
    verdict = "PASS" if result["token_p99_us"] <= 500 else "FAIL"
    print(f"token check p99 {result['token_p99_us']:.1f} µs (target <= 500 µs): {verdict}")


if __name__ == "__main__":
    main()
