"""Who is calling, as the handlers ask it: any credential, a tenant's caller, or an operator.
The tenant, once known, goes on the request's state for the access log and the metrics."""
from __future__ import annotations

from starlette.requests import Request

from .. import errors
from ..tenancy.auth import Authenticator, Principal


class Callers:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def any(self, request: Request) -> Principal:
        """Whoever the credential names (401 without a valid one)."""
        principal = await self.auth.authenticate(request.headers.get("authorization"))
        request.state.tenant = principal.tenant
        return principal

    async def tenant(self, request: Request) -> Principal:
        """A caller of the model endpoints (scope ``tenant``)."""
        principal = await self.any(request)
        principal.require("tenant")
        return principal

    async def metrics_reader(self, request: Request) -> Principal:
        """An operator, or a key of the ``metrics`` scope (a scraper's: it reads nothing else)."""
        principal = await self.any(request)
        if not (principal.is_admin or (principal.tenant is None and "metrics" in principal.scopes)):
            raise errors.PermissionDenied("Metrics need an admin or metrics credential.", code="admin_required")
        return principal

    async def admin(self, request: Request, what: str = "This endpoint") -> Principal:
        principal = await self.any(request)
        if not principal.is_admin:
            raise errors.PermissionDenied(f"{what} needs an admin credential.", code="admin_required")
        return principal
