"""People, organisations and login.

An organisation is a tenant: its id is the ``tenant`` every other table carries. A user belongs to
organisations with a role (``roles``); a user's access token is a short-lived JWT (``tokens``)
that names the user and the login session, never the role: each request resolves the role from
the memberships kept in memory (``cache``), so role changes and removals apply within
``identity.cache_refresh_s`` everywhere and at once in the process that made them. The role then
maps onto the API keys' scopes, so a user's request and an API key's request end up as the same
:class:`spendstream.keys.Principal` and every route keeps its one authorisation rule.

- ``passwords``: argon2id hashing (argon2-cffi) and the password policy; ``HashPool`` runs hashes
  in a bounded thread pool, off the event loop;
- ``tokens``: access tokens (pyjwt, HS256), refresh and invite tokens (opaque, stored hashed);
- ``roles``: role -> scopes, and who may grant which role;
- ``throttle``: the sliding-window login limits (per account, per IP);
- ``cache``: memberships and revoked sessions in memory, and ``authenticate_user``;
- ``store``: the ClickHouse tables of migration 0011 (users, orgs, members, invites, sessions,
  refresh tokens, revocations, audit log).
"""
