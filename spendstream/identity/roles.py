"""Roles of a user in an organisation and the API-key scopes each one stands for.

``owner`` and ``admin`` hold every scope (``admin`` routes: keys, budgets, webhooks, overrides,
members); ``member`` reads analytics and manages the API keys they created themselves (the
``keys`` scope); ``viewer`` only reads. Only an owner may make, change or remove an
owner, and an organisation always keeps at least one owner (``store`` checks that part).
"""

from __future__ import annotations

from spendstream.keys import SCOPES

ROLES: tuple[str, ...] = ("owner", "admin", "member", "viewer")

ROLE_SCOPES: dict[str, frozenset[str]] = {
    "owner": frozenset(SCOPES),
    "admin": frozenset(SCOPES),
    "member": frozenset({"read", "keys"}),
    "viewer": frozenset({"read"}),
}


class InvalidRole(ValueError):
    pass


def parse_role(role: str) -> str:
    value = role.strip().lower() if isinstance(role, str) else ""
    if value not in ROLES:
        raise InvalidRole(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    return value


def scopes_of(role: str) -> frozenset[str]:
    return ROLE_SCOPES.get(role, frozenset())


def may_assign(actor_role: str, old_role: str | None, new_role: str | None) -> str | None:
    """Why an actor with ``actor_role`` may not move a member from ``old_role`` to ``new_role``
    (None = add, None = remove), or None when allowed. API keys act as ``admin``."""
    if "admin" not in scopes_of(actor_role):
        return "managing members needs the owner or admin role"
    if "owner" in (old_role, new_role) and actor_role != "owner":
        return "only an owner may grant, change or remove the owner role"
    return None
